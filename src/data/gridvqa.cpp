// Fashion-MNIST IDX reader and the GridVQA builder.
#include <zlib.h>

#include <algorithm>
#include <filesystem>

#include "victor/gridvqa.h"
#include "victor/error.h"
#include "victor/files.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace victor {

const std::vector<std::string> kQuestionFamilies = {"identify", "count", "exist", "locate"};
const std::vector<std::string> kFashionClasses = {"t-shirt", "trouser", "pullover", "dress",
                                                  "coat",    "sandal",  "shirt",    "sneaker",
                                                  "bag",     "ankle boot"};
const std::vector<std::string> kFashionPlurals = {"t-shirts", "trousers", "pullovers", "dresses",
                                                  "coats",    "sandals",  "shirts",    "sneakers",
                                                  "bags",     "ankle boots"};

uint64_t Rng::next() {  // splitmix64
  uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
int Rng::uniform(int n) { return n <= 0 ? 0 : int(next() % uint64_t(n)); }
double Rng::unit() { return double(next() >> 11) * (1.0 / 9007199254740992.0); }

std::string read_gzip(const std::string& path) {
  if (!fs::exists(path)) throw Error(path + ": file not found");
  gzFile f = gzopen(path.c_str(), "rb");
  if (!f) throw Error(path + ": cannot open");
  std::string out;
  char buf[1 << 16];
  int n;
  while ((n = gzread(f, buf, sizeof buf)) > 0) out.append(buf, size_t(n));
  int err = 0;
  const char* msg = gzerror(f, &err);
  bool bad = n < 0 || (err != Z_OK && err != Z_STREAM_END);
  std::string why = bad ? std::string(msg) : "";
  gzclose(f);
  if (bad) throw Error(path + ": corrupt or truncated gzip data (" + why + ")");
  return out;
}

namespace {
uint32_t be32(const std::string& b, size_t at) {
  return (uint32_t(uint8_t(b[at])) << 24) | (uint32_t(uint8_t(b[at + 1])) << 16) |
         (uint32_t(uint8_t(b[at + 2])) << 8) | uint32_t(uint8_t(b[at + 3]));
}
}  // namespace

IdxImages read_idx_images(const std::string& path) {
  std::string b = read_gzip(path);
  if (b.size() < 16) throw Error(path + ": truncated IDX header");
  if (be32(b, 0) != 0x00000803) throw Error(path + ": bad IDX magic number (expected 2051, images)");
  IdxImages out;
  out.count = int(be32(b, 4));
  out.rows = int(be32(b, 8));
  out.cols = int(be32(b, 12));
  if (out.rows != 28 || out.cols != 28)
    throw Error(path + ": expected 28x28 images, got " + std::to_string(out.rows) + "x" +
                std::to_string(out.cols));
  size_t need = 16 + size_t(out.count) * out.rows * out.cols;
  if (b.size() != need)
    throw Error(path + ": truncated or oversized IDX data (" + std::to_string(b.size()) +
                " bytes, header says " + std::to_string(need) + ")");
  out.pixels.assign(b.begin() + 16, b.end());
  return out;
}

std::vector<uint8_t> read_idx_labels(const std::string& path) {
  std::string b = read_gzip(path);
  if (b.size() < 8) throw Error(path + ": truncated IDX header");
  if (be32(b, 0) != 0x00000801) throw Error(path + ": bad IDX magic number (expected 2049, labels)");
  size_t count = be32(b, 4);
  if (b.size() != 8 + count)
    throw Error(path + ": truncated or oversized IDX labels (" + std::to_string(b.size()) +
                " bytes, header says " + std::to_string(8 + count) + ")");
  std::vector<uint8_t> out(b.begin() + 8, b.end());
  for (auto l : out)
    if (l > 9) throw Error(path + ": label " + std::to_string(l) + " out of range 0-9");
  return out;
}

namespace {
// Each of the grid's cells empty with probability empty_rate, else a random item of the split.
void draw_cells(Grid& g, double empty_rate, const std::vector<uint8_t>& labels, Rng& rng) {
  for (int i = 0; i < g.cells(); ++i) {
    if (rng.unit() < empty_rate) {
      g.labels.push_back(-1);
      g.items.push_back(-1);
    } else {
      int item = rng.uniform(int(labels.size()));
      g.items.push_back(item);
      g.labels.push_back(labels[item]);
    }
  }
}
}  // namespace

Grid random_grid(int size, double empty_rate, const std::vector<uint8_t>& labels, Rng& rng) {
  Grid g;
  g.rows = g.cols = size;
  draw_cells(g, empty_rate, labels, rng);
  return g;
}

Grid random_scattered_grid(int rows, int cols, const GridVqaOptions& opt, const std::vector<uint8_t>& labels,
                           Rng& rng) {
  Grid g;
  g.rows = rows;
  g.cols = cols;
  g.cell_pixels = opt.cell_pixels;
  draw_cells(g, opt.empty_rate, labels, rng);
  const int C = opt.cell_pixels;
  for (int cell = 0; cell < rows * cols; ++cell) {
    if (g.items[cell] < 0) {
      g.places.push_back({});
      continue;
    }
    Placement p;
    p.side = opt.item_min + rng.uniform(opt.item_max - opt.item_min + 1);
    // The centre anywhere in the cell; the square kept inside the canvas (its centre stays in the
    // cell: side <= cell_pixels).
    const int cx = (cell % cols) * C + rng.uniform(C), cy = (cell / cols) * C + rng.uniform(C);
    p.x = std::clamp(cx - p.side / 2, 0, g.width() - p.side);
    p.y = std::clamp(cy - p.side / 2, 0, g.height() - p.side);
    g.places.push_back(p);
  }
  return g;
}

namespace {
// Where cell `cell`'s item is drawn: its placement, or in the aligned layout the whole 28-pixel cell.
Placement placement(const Grid& g, int cell) {
  if (!g.places.empty()) return g.places[size_t(cell)];
  return {(cell % g.cols) * 28, (cell / g.cols) * 28, 28};
}
}  // namespace

Image render_grid(const Grid& g, const IdxImages& items) {
  Image img;
  img.width = g.width();
  img.height = g.height();
  img.rgb.assign(size_t(img.width) * img.height * 3, 0);
  for (int cell = 0; cell < g.cells(); ++cell) {
    if (g.items[cell] < 0) continue;
    const uint8_t* src = items.pixels.data() + size_t(g.items[cell]) * 784;
    // At side 28 (the aligned layout) every weight is 0 or 1: the item's own pixels, exactly.
    const Placement p = placement(g, cell);
    const double step = 28.0 / p.side;
    for (int y = 0; y < p.side; ++y) {
      const double sy = std::clamp((y + 0.5) * step - 0.5, 0.0, 27.0);
      const int y0 = std::min(int(sy), 26);
      const double fy = sy - y0;
      for (int x = 0; x < p.side; ++x) {
        const double sx = std::clamp((x + 0.5) * step - 0.5, 0.0, 27.0);
        const int x0 = std::min(int(sx), 26);
        const double fx = sx - x0;
        const double v = (1 - fy) * ((1 - fx) * src[y0 * 28 + x0] + fx * src[y0 * 28 + x0 + 1]) +
                         fy * ((1 - fx) * src[(y0 + 1) * 28 + x0] + fx * src[(y0 + 1) * 28 + x0 + 1]);
        const uint8_t u = uint8_t(std::lround(std::clamp(v, 0.0, 255.0)));
        uint8_t* px = &img.rgb[(size_t(p.y + y) * img.width + p.x + x) * 3];
        for (int c = 0; c < 3; ++c) px[c] = std::max(px[c], u);
      }
    }
  }
  return img;
}

namespace {

int count_of(const Grid& g, int cls) {
  return int(std::count(g.labels.begin(), g.labels.end(), cls));
}

std::vector<int> cells_of(const Grid& g, int cls) {
  std::vector<int> out;
  for (int i = 0; i < int(g.labels.size()); ++i)
    if (g.labels[i] == cls) out.push_back(i);
  return out;
}

std::string cell_name(const Grid& g, int cell) {
  return "row " + std::to_string(cell / g.cols + 1) + ", column " + std::to_string(cell % g.cols + 1);
}

int find_class(const std::string& text, const std::vector<std::string>& names) {
  // Longest match first ("t-shirt" inside "t-shirts", "shirt" inside "t-shirt").
  int best = -1;
  size_t best_len = 0;
  for (int c = 0; c < 10; ++c) {
    size_t p = text.find(" " + names[c]);
    if (p != std::string::npos && names[c].size() > best_len) {
      best = c;
      best_len = names[c].size();
    }
  }
  return best;
}

}  // namespace

std::array<double, 4> cell_box(int rows, int cols, int cell) {
  const double r = cell / cols, c = cell % cols;
  return {c / cols, r / rows, (c + 1) / cols, (r + 1) / rows};
}

std::array<double, 4> item_box(const Grid& g, int cell) {
  if (g.items[cell] < 0) return cell_box(g.rows, g.cols, cell);  // an empty cell: the cell itself
  // Pixels over pixels: the aligned layout's 28c / 28n is c / n to the last bit (both correctly rounded).
  const Placement p = placement(g, cell);
  const double W = g.width(), H = g.height();
  return {p.x / W, p.y / H, (p.x + p.side) / W, (p.y + p.side) / H};
}

QA ask(const Grid& g, const std::string& family, Rng& rng) {
  QA q;
  q.family = family;
  if (family == "identify") {
    int cell = rng.uniform(g.cells());
    q.question = "What is in " + cell_name(g, cell) + "?";
    q.answer = g.labels[cell] < 0 ? "nothing" : kFashionClasses[g.labels[cell]];
    q.cells = {cell};
  } else if (family == "count") {
    // Mostly classes that are present, so counts above zero are common.
    std::vector<int> present;
    for (int c = 0; c < 10; ++c)
      if (count_of(g, c) > 0) present.push_back(c);
    int cls = (!present.empty() && rng.unit() < 0.8) ? present[rng.uniform(int(present.size()))]
                                                     : rng.uniform(10);
    q.question = "How many " + kFashionPlurals[cls] + " are there?";
    q.answer = std::to_string(count_of(g, cls));
    q.cells = cells_of(g, cls);
  } else if (family == "exist") {
    std::vector<int> present, absent;
    for (int c = 0; c < 10; ++c) (count_of(g, c) > 0 ? present : absent).push_back(c);
    bool yes = absent.empty() || (!present.empty() && rng.unit() < 0.5);
    int cls = yes ? present[rng.uniform(int(present.size()))] : absent[rng.uniform(int(absent.size()))];
    std::string art = (kFashionClasses[cls][0] == 'a') ? "an " : "a ";
    q.question = "Is there " + art + kFashionClasses[cls] + "?";
    q.answer = yes ? "yes" : "no";
    q.cells = cells_of(g, cls);
  } else if (family == "locate") {
    std::vector<int> unique;
    for (int c = 0; c < 10; ++c)
      if (count_of(g, c) == 1) unique.push_back(c);
    if (unique.empty()) return q;
    int cls = unique[rng.uniform(int(unique.size()))];
    int cell = int(std::find(g.labels.begin(), g.labels.end(), cls) - g.labels.begin());
    q.question = "Where is the " + kFashionClasses[cls] + "?";
    q.answer = cell_name(g, cell);
    q.cells = {cell};
  } else {
    throw Error("unknown question family '" + family + "'");
  }
  return q;
}

std::string describe_grid(const Grid& g) {
  std::string s;
  for (int r = 0; r < g.rows; ++r) {
    s += (r ? " row " : "row ") + std::to_string(r + 1) + ":";
    for (int c = 0; c < g.cols; ++c) {
      int lab = g.labels[r * g.cols + c];
      s += (c ? ", " : " ") + (lab < 0 ? std::string("nothing") : kFashionClasses[lab]);
    }
    s += ".";
  }
  return s;
}

std::vector<QA> ask_balanced(const Grid& g, int n, Rng& rng, const std::vector<std::string>& families) {
  if (families.empty()) throw Error("GridVQA: no question families to ask");
  const int f = int(families.size());
  std::vector<QA> out;
  int start = rng.uniform(f);
  for (int i = 0; int(out.size()) < n && i < 4 * n; ++i) {
    QA q = ask(g, families[(start + i) % f], rng);
    if (q.answer.empty()) continue;
    bool dup = false;
    for (auto& o : out) dup |= o.question == q.question;
    if (!dup) out.push_back(q);
  }
  return out;
}

// A grid and its questions. A grid that none of the families can ask about (locate alone on a grid
// without a unique item) is drawn again, so no sample is written without a question. Identify,
// count and exist can always ask, so with any of them the random stream is unchanged.
namespace {
struct AskedGrid {
  Grid grid;
  std::vector<QA> qas;
};

AskedGrid draw_asked_grid(const GridVqaOptions& opt, const std::vector<uint8_t>& labels, Rng& rng) {
  for (int attempt = 0; attempt < 1000; ++attempt) {
    AskedGrid a;
    if (opt.scattered) {
      const auto [rows, cols] = opt.canvases[size_t(rng.uniform(int(opt.canvases.size())))];
      a.grid = random_scattered_grid(rows, cols, opt, labels, rng);
    } else {
      a.grid = random_grid(opt.grid, opt.empty_rate, labels, rng);
    }
    a.qas = ask_balanced(a.grid, opt.questions_per_image, rng, opt.families);
    if (!a.qas.empty()) return a;
  }
  throw Error("gridvqa: 1000 grids in a row had no question for --families (try a lower --empty-rate)");
}
}  // namespace

std::string answer_from_grid(const Grid& g, const QA& qa) {
  const std::string& q = qa.question;
  if (qa.family == "identify") {
    int r = 0, c = 0;
    if (std::sscanf(q.c_str(), "What is in row %d, column %d?", &r, &c) != 2) return "";
    if (r < 1 || r > g.rows || c < 1 || c > g.cols) return "";
    int lab = g.labels[(r - 1) * g.cols + (c - 1)];
    return lab < 0 ? "nothing" : kFashionClasses[lab];
  }
  if (qa.family == "count") return std::to_string(count_of(g, find_class(q, kFashionPlurals)));
  if (qa.family == "exist") return count_of(g, find_class(q, kFashionClasses)) > 0 ? "yes" : "no";
  if (qa.family == "locate") {
    int cls = find_class(q, kFashionClasses);
    if (count_of(g, cls) != 1) return "";
    int cell = int(std::find(g.labels.begin(), g.labels.end(), cls) - g.labels.begin());
    return cell_name(g, cell);
  }
  return "";
}

GridVqaSummary build_gridvqa(const GridVqaOptions& opt, const std::function<void(int, int)>& progress) {
  if (opt.grid < 1 || opt.grid > 8) throw Error("gridvqa: --grid must be between 1 and 8");
  if (opt.train_images < 0 || opt.test_images < 0) throw Error("gridvqa: image counts must be >= 0");
  if (opt.questions_per_image < 1) throw Error("gridvqa: --questions must be >= 1");
  if (opt.empty_rate < 0 || opt.empty_rate >= 1) throw Error("gridvqa: --empty-rate must be in [0, 1)");
  if (opt.families.empty()) throw Error("gridvqa: --families is empty");
  if (opt.scattered) {
    if (opt.canvases.empty()) throw Error("gridvqa: --canvases is empty");
    for (auto [r, c] : opt.canvases)
      if (r < 1 || c < 1 || r * c > 64)
        throw Error("gridvqa: --canvases: " + std::to_string(r) + "x" + std::to_string(c) +
                    " (rows and columns >= 1, at most 64 cells)");
    if (opt.cell_pixels < 8 || opt.cell_pixels > 448) throw Error("gridvqa: --cell-pixels must be between 8 and 448");
    if (opt.item_min < 4 || opt.item_min > opt.item_max || opt.item_max > opt.cell_pixels)
      throw Error("gridvqa: --item-pixels MIN-MAX must satisfy 4 <= MIN <= MAX <= --cell-pixels (" +
                  std::to_string(opt.item_min) + "-" + std::to_string(opt.item_max) + ", cells of " +
                  std::to_string(opt.cell_pixels) + ")");
  }
  for (size_t i = 0; i < opt.families.size(); ++i) {
    const auto& f = opt.families[i];
    if (std::find(kQuestionFamilies.begin(), kQuestionFamilies.end(), f) == kQuestionFamilies.end())
      throw Error("gridvqa: unknown question family '" + f + "' in --families (identify, count, exist, locate)");
    if (std::find(opt.families.begin(), opt.families.begin() + i, f) != opt.families.begin() + i)
      throw Error("gridvqa: question family '" + f + "' given twice in --families");
  }
  auto src = [&](const std::string& f) { return (fs::path(opt.source_dir) / f).string(); };
  IdxImages train_items = read_idx_images(src("train-images-idx3-ubyte.gz"));
  auto train_labels = read_idx_labels(src("train-labels-idx1-ubyte.gz"));
  IdxImages test_items = read_idx_images(src("t10k-images-idx3-ubyte.gz"));
  auto test_labels = read_idx_labels(src("t10k-labels-idx1-ubyte.gz"));
  if (int(train_labels.size()) != train_items.count || int(test_labels.size()) != test_items.count)
    throw Error(opt.source_dir + ": image and label counts differ");

  fs::create_directories(fs::path(opt.out_dir) / "images");
  Rng rng(opt.seed);
  GridVqaSummary sum;
  json train = json::array();
  json pretrain = json::array();  // LLaVA stage-1 style: one dense description per image
  std::string grids;  // grids.jsonl: each image's cells (labels and source items), for audits
  auto grid_line = [&](const std::string& image, const char* split, const Grid& g) {
    json line = {{"image", image}, {"split", split}, {"rows", g.rows}, {"cols", g.cols},
                 {"labels", g.labels}, {"items", g.items}};
    if (g.places.empty() && g.rows == g.cols) line["grid"] = g.rows;
    if (!g.places.empty()) {
      line["cell_pixels"] = g.cell_pixels;
      json places = json::array();  // [x, y, side] per cell, in pixels
      for (const auto& p : g.places) places.push_back({p.x, p.y, p.side});
      line["places"] = places;
    }
    grids += line.dump() + "\n";
  };
  const int total = opt.train_images + opt.test_images;
  char name[64];
  for (int i = 0; i < opt.train_images; ++i) {
    auto [g, qas] = draw_asked_grid(opt, train_labels, rng);
    std::snprintf(name, sizeof name, "images/train_%06d.png", i);
    save_png(render_grid(g, train_items), (fs::path(opt.out_dir) / name).string());
    grid_line(name, "train", g);
    json conv = json::array();
    for (size_t t = 0; t < qas.size(); ++t) {
      conv.push_back({{"from", "human"}, {"value", (t == 0 ? "<image>\n" : "") + qas[t].question}});
      json boxes = json::array();
      for (int cell : qas[t].cells) boxes.push_back(item_box(g, cell));
      conv.push_back({{"from", "gpt"}, {"value", qas[t].answer}, {"boxes", boxes}});
    }
    char id[32];
    std::snprintf(id, sizeof id, "train_%06d", i);
    train.push_back({{"id", id}, {"image", name}, {"conversations", conv}});
    pretrain.push_back({{"id", std::string(id) + "_describe"},
                        {"image", name},
                        {"conversations",
                         {{{"from", "human"}, {"value", "<image>\nList the items row by row."}},
                          {{"from", "gpt"}, {"value", describe_grid(g)}}}}});
    sum.train_questions += int(qas.size());
    ++sum.train_images;
    if (progress) progress(i + 1, total);
  }
  std::string test;
  int qid = 0;
  std::map<std::string, int> family_counts;
  for (int i = 0; i < opt.test_images; ++i) {
    auto [g, qas] = draw_asked_grid(opt, test_labels, rng);
    std::snprintf(name, sizeof name, "images/test_%06d.png", i);
    save_png(render_grid(g, test_items), (fs::path(opt.out_dir) / name).string());
    grid_line(name, "t10k", g);
    for (auto& qa : qas) {
      json line = {{"question_id", qid++}, {"image", name}, {"text", qa.question},
                   {"answer", qa.answer}, {"family", qa.family}};
      test += line.dump() + "\n";
      family_counts[qa.family]++;
      ++sum.test_questions;
    }
    ++sum.test_images;
    if (progress) progress(opt.train_images + i + 1, total);
  }
  // The text corpus: its own stream, so the images and questions above do not depend on it.
  json text = json::array();
  Rng text_rng(opt.seed ^ 0x7465787467726964ull);
  for (int i = 0; i < opt.text_grids; ++i) {
    auto [g, qas] = draw_asked_grid(opt, train_labels, text_rng);
    json conv = json::array();
    for (size_t t = 0; t < qas.size(); ++t) {
      conv.push_back({{"from", "human"}, {"value", (t == 0 ? describe_grid(g) + "\n" : "") + qas[t].question}});
      conv.push_back({{"from", "gpt"}, {"value", qas[t].answer}});
    }
    char id[32];
    std::snprintf(id, sizeof id, "text_%06d", i);
    text.push_back({{"id", id}, {"conversations", conv}});
    ++sum.text_grids;
  }
  write_file_atomic((fs::path(opt.out_dir) / "text.json").string(), text.dump() + "\n");
  write_file_atomic((fs::path(opt.out_dir) / "train.json").string(), train.dump(1) + "\n");
  write_file_atomic((fs::path(opt.out_dir) / "test.jsonl").string(), test);
  write_file_atomic((fs::path(opt.out_dir) / "pretrain.json").string(), pretrain.dump(1) + "\n");
  write_file_atomic((fs::path(opt.out_dir) / "grids.jsonl").string(), grids);
  json meta = {{"dataset", "GridVQA"},
               {"seed", opt.seed},
               {"layout", opt.scattered ? "scattered" : "aligned"},
               {"grid", opt.grid},
               {"empty_rate", opt.empty_rate},
               {"questions_per_image", opt.questions_per_image},
               {"families", opt.families},
               {"train_images", sum.train_images},
               {"test_images", sum.test_images},
               {"train_questions", sum.train_questions},
               {"test_questions", sum.test_questions},
               {"test_questions_per_family", family_counts},
               {"text_grids", sum.text_grids},
               {"files", {{"train", "train.json"}, {"test", "test.jsonl"}, {"pretrain", "pretrain.json"},
                          {"grids", "grids.jsonl"}, {"text", "text.json"}}},
               {"classes", kFashionClasses},
               {"source_files",
                {src("train-images-idx3-ubyte.gz"), src("train-labels-idx1-ubyte.gz"),
                 src("t10k-images-idx3-ubyte.gz"), src("t10k-labels-idx1-ubyte.gz")}},
               {"source_split", {{"train", "train"}, {"test", "t10k"}}}};
  if (opt.scattered) {
    meta.erase("grid");
    json canv = json::array();
    for (auto [r, c] : opt.canvases) canv.push_back({r, c});
    meta["canvases"] = canv;  // [rows, cols] cells
    meta["cell_pixels"] = opt.cell_pixels;
    meta["item_pixels"] = {opt.item_min, opt.item_max};
  }
  write_file_atomic((fs::path(opt.out_dir) / "meta.json").string(), meta.dump(2) + "\n");
  return sum;
}

std::vector<std::string> gridvqa_corpus() {
  std::vector<std::string> lines;
  for (int r = 1; r <= 8; ++r)
    for (int c = 1; c <= 8; ++c) {
      lines.push_back("USER: What is in row " + std::to_string(r) + ", column " + std::to_string(c) +
                      "? ASSISTANT: nothing");
      lines.push_back("row " + std::to_string(r) + ", column " + std::to_string(c));
    }
  for (int k = 0; k < 10; ++k) {
    lines.push_back("How many " + kFashionPlurals[k] + " are there? " + std::to_string(k));
    lines.push_back("Is there a " + kFashionClasses[k] + "? yes no");
    lines.push_back("Where is the " + kFashionClasses[k] + "? " + kFashionClasses[k]);
  }
  lines.push_back("List the items row by row. row 1: sneaker, nothing, bag, coat.");
  lines.push_back("USER: ASSISTANT: Describe the image. What is this? A chat between a curious human "
                  "and an artificial intelligence assistant.");
  return lines;
}

}  // namespace victor
