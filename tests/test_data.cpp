// GridVQA and the Fashion-MNIST reader.
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <zlib.h>

#include "helpers.h"
#include "victor/gridvqa.h"
#include "victor/error.h"
#include "victor/files.h"
#include "victor/repro.h"

using namespace victor;
using namespace victor::test;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {
const std::string kSource = "/usr/share/datasets/fashion-mnist";

GridVqaOptions small_options(const std::string& out, uint64_t seed) {
  GridVqaOptions o;
  o.out_dir = out;
  o.train_images = 12;
  o.test_images = 6;
  o.text_grids = 40;
  o.seed = seed;
  return o;
}

Grid grid_from(const json& j) {
  Grid g;
  g.rows = j["rows"].get<int>();
  g.cols = j["cols"].get<int>();
  if (j.contains("places")) {
    g.cell_pixels = j["cell_pixels"].get<int>();
    for (const auto& p : j["places"]) g.places.push_back({p[0].get<int>(), p[1].get<int>(), p[2].get<int>()});
  }
  g.labels = j["labels"].get<std::vector<int>>();
  g.items = j["items"].get<std::vector<int>>();
  return g;
}
}  // namespace

TEST(FashionMnist, ReaderValidatesHeaderAndSize) {
  auto imgs = read_idx_images(kSource + "/t10k-images-idx3-ubyte.gz");
  auto labels = read_idx_labels(kSource + "/t10k-labels-idx1-ubyte.gz");
  EXPECT_EQ(imgs.count, 10000);
  EXPECT_EQ(labels.size(), 10000u);
  auto dir = temp_dir("idx");
  // Truncated: a gzip of the first 1000 bytes.
  std::string raw = read_gzip(kSource + "/t10k-images-idx3-ubyte.gz");
  gzFile f = gzopen((dir + "/trunc.gz").c_str(), "wb");
  gzwrite(f, raw.data(), 1000);
  gzclose(f);
  try {
    read_idx_images(dir + "/trunc.gz");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("trunc.gz"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos);
  }
  EXPECT_THROW(read_idx_labels(kSource + "/t10k-images-idx3-ubyte.gz"), Error);  // wrong magic
}

TEST(GridVqa, AnswersAgreeWithGridForEveryFamily) {
  auto labels = read_idx_labels(kSource + "/t10k-labels-idx1-ubyte.gz");
  Rng rng(5);
  std::map<std::string, int> families;
  for (int i = 0; i < 300; ++i) {
    Grid g = random_grid(4, 0.3, labels, rng);
    for (auto& qa : ask_balanced(g, 4, rng)) {
      EXPECT_EQ(answer_from_grid(g, qa), qa.answer) << qa.question;
      families[qa.family]++;
    }
  }
  EXPECT_EQ(families.size(), 4u);
  for (auto& [f, n] : families) EXPECT_GT(n, 200) << f;  // balanced
}

TEST(GridVqa, SplitsAreDisjointAndFilesDeterministic) {
  auto a = temp_dir("gq_a"), b = temp_dir("gq_b");
  build_gridvqa(small_options(a, 3));
  build_gridvqa(small_options(b, 3));
  for (auto f : {"train.json", "test.jsonl", "meta.json", "grids.jsonl", "text.json", "images/test_000002.png"})
    EXPECT_EQ(read_file(a + "/" + f, FileKind::Dataset), read_file(b + "/" + f, FileKind::Dataset)) << f;
  // Every cell's pixels come from its own split's items, and every test answer matches its grid.
  auto train_items = read_idx_images(kSource + "/train-images-idx3-ubyte.gz");
  auto test_items = read_idx_images(kSource + "/t10k-images-idx3-ubyte.gz");
  std::map<std::string, Grid> grids;
  std::istringstream in(read_file(a + "/grids.jsonl", FileKind::Dataset));
  std::string line;
  while (std::getline(in, line)) {
    json j = json::parse(line);
    Grid g = grid_from(j);
    bool test_split = j["split"] == "t10k";
    EXPECT_EQ(test_split, j["image"].get<std::string>().find("test_") != std::string::npos);
    Image img = load_image(a + "/" + j["image"].get<std::string>());
    Image ref = render_grid(g, test_split ? test_items : train_items);
    EXPECT_EQ(img.rgb, ref.rgb);
    grids[j["image"]] = g;
  }
  int checked = 0;
  for (auto& q : load_questions_jsonl(a + "/test.jsonl")) {
    QA qa{q.family, q.text, q.answer};
    EXPECT_EQ(answer_from_grid(grids.at(q.image), qa), q.answer);
    ++checked;
  }
  EXPECT_EQ(checked, 24);
  auto convs = load_llava_json(a + "/train.json");
  EXPECT_EQ(convs.size(), 12u);
  EXPECT_EQ(convs[0].turns.size(), 4u);  // multi-turn
  EXPECT_EQ(convs[0].turns[0].human.rfind("<image>\n", 0), 0u);
  // A different seed gives different data.
  auto c = temp_dir("gq_c");
  build_gridvqa(small_options(c, 4));
  EXPECT_NE(read_file(a + "/test.jsonl", FileKind::Dataset), read_file(c + "/test.jsonl", FileKind::Dataset));
}

// GridVQA-HR: every item drawn where grids.jsonl places it (inside the canvas, its centre in its
// cell, its side in range), nothing drawn elsewhere, items off the 7-pixel patch grid and some
// across the 112-pixel crop boundary, non-square canvases, answers and boxes from the grid.
TEST(GridVqa, ScatteredLayoutPlacesItemsOffTheGridInsideTheirCells) {
  auto a = temp_dir("gq_hr"), b = temp_dir("gq_hr2");
  GridVqaOptions o = small_options(a, 7);
  o.scattered = true;
  o.train_images = 30;
  build_gridvqa(o);
  o.out_dir = b;
  build_gridvqa(o);
  for (auto f : {"train.json", "test.jsonl", "grids.jsonl", "images/train_000003.png"})
    EXPECT_EQ(read_file(a + "/" + f, FileKind::Dataset), read_file(b + "/" + f, FileKind::Dataset)) << f;
  auto train_items = read_idx_images(kSource + "/train-images-idx3-ubyte.gz");
  auto test_items = read_idx_images(kSource + "/t10k-images-idx3-ubyte.gz");
  std::map<std::string, Grid> grids;
  std::set<std::pair<int, int>> shapes;
  int off_grid = 0, across_crops = 0, items = 0;
  std::istringstream in(read_file(a + "/grids.jsonl", FileKind::Dataset));
  std::string line;
  while (std::getline(in, line)) {
    json j = json::parse(line);
    Grid g = grid_from(j);
    ASSERT_EQ(g.places.size(), size_t(g.cells()));
    shapes.insert({g.rows, g.cols});
    Image img = load_image(a + "/" + j["image"].get<std::string>());
    ASSERT_EQ(img.width, g.cols * 56);
    ASSERT_EQ(img.height, g.rows * 56);
    EXPECT_EQ(img.rgb, render_grid(g, j["split"] == "t10k" ? test_items : train_items).rgb);
    std::vector<bool> covered(size_t(img.width) * img.height, false);
    for (int cell = 0; cell < g.cells(); ++cell) {
      const Placement& p = g.places[cell];
      if (g.items[cell] < 0) {
        EXPECT_EQ(p.side, 0);
        continue;
      }
      ++items;
      EXPECT_GE(p.side, 14);
      EXPECT_LE(p.side, 40);
      ASSERT_GE(p.x, 0);
      ASSERT_GE(p.y, 0);
      ASSERT_LE(p.x + p.side, img.width);
      ASSERT_LE(p.y + p.side, img.height);
      const int cx = p.x + p.side / 2, cy = p.y + p.side / 2;
      EXPECT_EQ(cx / 56, cell % g.cols) << cell;
      EXPECT_EQ(cy / 56, cell / g.cols) << cell;
      off_grid += p.x % 7 != 0 || p.y % 7 != 0;
      across_crops += (p.x < 112 && p.x + p.side > 112) || (p.y < 112 && p.y + p.side > 112);
      for (int y = p.y; y < p.y + p.side; ++y)
        for (int x = p.x; x < p.x + p.side; ++x) covered[size_t(y) * img.width + x] = true;
    }
    for (size_t i = 0; i < covered.size(); ++i)
      if (!covered[i]) ASSERT_EQ(img.rgb[i * 3], 0) << "pixel " << i << " of " << j["image"];
    grids[j["image"]] = g;
  }
  EXPECT_GT(items, 200);
  EXPECT_GT(off_grid, items / 2);
  EXPECT_GT(across_crops, 10);
  EXPECT_GE(shapes.size(), 4u);
  for (auto& q : load_questions_jsonl(a + "/test.jsonl"))
    EXPECT_EQ(answer_from_grid(grids.at(q.image), QA{q.family, q.text, q.answer}), q.answer) << q.text;
  // Boxes are the items' own squares (an empty cell's: the cell).
  for (auto& c : load_llava_json(a + "/train.json")) {
    const Grid& g = grids.at(c.image);
    for (auto& t : c.turns)
      for (auto& box : t.boxes) {
        bool found = false;
        for (int cell = 0; cell < g.cells() && !found; ++cell) {
          auto e = item_box(g, cell);
          if (g.items[cell] < 0)  // an empty cell's box is the cell
            EXPECT_EQ(e, (std::array<double, 4>{double(cell % g.cols) / g.cols, double(cell / g.cols) / g.rows,
                                                double(cell % g.cols + 1) / g.cols, double(cell / g.cols + 1) / g.rows}));
          found = true;
          for (int k = 0; k < 4; ++k) found = found && std::abs(box[k] - e[k]) < 1e-6;
        }
        EXPECT_TRUE(found) << c.id;
      }
  }
  json meta = json::parse(read_file(a + "/meta.json", FileKind::Dataset));
  EXPECT_EQ(meta["layout"], "scattered");
  EXPECT_EQ(meta["item_pixels"], json({14, 40}));
}

// The resampling, by hand: at half size every output pixel is the mean of its 2x2 source block;
// at double size pixel (2y+1, 2x+1) is 3/4 of source (y, x) along each axis, 1/4 of the next.
TEST(GridVqa, ScatteredItemsAreResampledBilinearly) {
  IdxImages items;
  items.count = 1;
  items.rows = items.cols = 28;
  for (int i = 0; i < 784; ++i) items.pixels.push_back(uint8_t((i * 37 + (i / 28) * 11) % 256));
  const auto src = [&](int y, int x) { return double(items.pixels[size_t(y) * 28 + x]); };
  Grid g;
  g.rows = g.cols = 1;
  g.cell_pixels = 64;
  g.labels = {0};
  g.items = {0};
  g.places = {{3, 5, 14}};
  Image half = render_grid(g, items);
  for (int y = 0; y < 14; ++y)
    for (int x = 0; x < 14; ++x) {
      double m = (src(2 * y, 2 * x) + src(2 * y, 2 * x + 1) + src(2 * y + 1, 2 * x) + src(2 * y + 1, 2 * x + 1)) / 4;
      ASSERT_EQ(half.rgb[(size_t(5 + y) * 64 + 3 + x) * 3 + 1], uint8_t(std::lround(m))) << y << "," << x;
    }
  g.places = {{0, 0, 56}};
  Image twice = render_grid(g, items);
  for (int y = 0; y < 27; ++y)
    for (int x = 0; x < 27; ++x) {
      double v = 0.75 * (0.75 * src(y, x) + 0.25 * src(y, x + 1)) + 0.25 * (0.75 * src(y + 1, x) + 0.25 * src(y + 1, x + 1));
      ASSERT_EQ(twice.rgb[(size_t(2 * y + 1) * 64 + 2 * x + 1) * 3], uint8_t(std::lround(v))) << y << "," << x;
    }
}

TEST(GridVqa, ScatteredOptionsAreCheckedByName) {
  auto a = temp_dir("gq_hr_bad");
  GridVqaOptions o = small_options(a, 1);
  o.scattered = true;
  o.item_max = 60;
  EXPECT_NE(error_of([&] { build_gridvqa(o); }).find("--item-pixels"), std::string::npos);
  o.item_max = 40;
  o.canvases = {{0, 3}};
  EXPECT_NE(error_of([&] { build_gridvqa(o); }).find("--canvases: 0x3"), std::string::npos);
  o.canvases = {};
  EXPECT_NE(error_of([&] { build_gridvqa(o); }).find("--canvases is empty"), std::string::npos);
}

// --families restricts every file's questions to those families; bad lists are refused by name.
TEST(GridVqa, FamiliesOptionAsksOnlyThoseFamilies) {
  auto a = temp_dir("gq_fam");
  GridVqaOptions o = small_options(a, 5);
  o.grid = 2;
  o.families = {"identify", "locate"};
  build_gridvqa(o);
  std::set<std::string> seen;
  for (auto& q : load_questions_jsonl(a + "/test.jsonl")) seen.insert(q.family);
  EXPECT_EQ(seen, (std::set<std::string>{"identify", "locate"}));
  for (auto& c : load_llava_json(a + "/train.json"))
    for (auto& t : c.turns) {
      auto h = t.human.substr(t.human.rfind('\n') + 1);
      EXPECT_TRUE(h.rfind("What is in", 0) == 0 || h.rfind("Where is", 0) == 0) << h;
    }
  EXPECT_EQ(json::parse(read_file(a + "/meta.json", FileKind::Dataset))["families"], json({"identify", "locate"}));
  auto message = [&](std::vector<std::string> families) {
    o.families = families;
    try {
      build_gridvqa(o);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message({"identify", "colour"}).find("unknown question family 'colour'"), std::string::npos);
  EXPECT_NE(message({"count", "count"}).find("'count' given twice"), std::string::npos);
  EXPECT_NE(message({}).find("--families is empty"), std::string::npos);
}

// Locate alone on 2x2 grids: many grids hold no unique item and have no locate question. They are
// drawn again, so every sample in every file has a question (an empty conversation is not a sample).
TEST(GridVqa, AFamilyThatCannotAskAboutAGridDrawsAnother) {
  auto a = temp_dir("gq_locate");
  GridVqaOptions o = small_options(a, 8);
  o.grid = 2;
  o.empty_rate = 0.6;  // most 2x2 grids then hold at most one item, or two of the same class
  o.train_images = 40;
  o.test_images = 20;
  o.families = {"locate"};
  build_gridvqa(o);
  auto convs = load_llava_json(a + "/train.json");
  ASSERT_EQ(convs.size(), 40u);
  for (auto& c : convs) EXPECT_FALSE(c.turns.empty()) << c.id;
  std::set<std::string> asked;
  for (auto& q : load_questions_jsonl(a + "/test.jsonl")) asked.insert(q.image);
  EXPECT_EQ(asked.size(), 20u);  // every test image has at least one question
  auto text = json::parse(read_file(a + "/text.json", FileKind::Dataset));
  ASSERT_EQ(text.size(), 40u);
  for (auto& t : text) EXPECT_FALSE(t["conversations"].empty()) << t["id"];
}

// text.json, the language model's corpus: every answer agrees with the grid its description
// writes out, there is no image, and the image files do not depend on it.
TEST(GridVqa, TextCorpusAnswersAgreeWithItsDescriptions) {
  auto a = temp_dir("gq_text"), b = temp_dir("gq_notext");
  build_gridvqa(small_options(a, 7));
  GridVqaOptions none = small_options(b, 7);
  none.text_grids = 0;
  build_gridvqa(none);
  for (auto f : {"train.json", "test.jsonl", "grids.jsonl"})
    EXPECT_EQ(read_file(a + "/" + f, FileKind::Dataset), read_file(b + "/" + f, FileKind::Dataset)) << f;
  auto convs = load_llava_json(a + "/text.json");
  ASSERT_EQ(convs.size(), 40u);
  auto index_of = [](const std::string& name) {
    if (name == "nothing") return -1;
    for (int c = 0; c < 10; ++c)
      if (kFashionClasses[size_t(c)] == name) return c;
    throw Error("unknown item '" + name + "'");
  };
  std::map<std::string, int> families;
  for (auto& c : convs) {
    EXPECT_TRUE(c.image.empty()) << c.id;
    const std::string& first = c.turns[0].human;
    EXPECT_EQ(first.find("<image>"), std::string::npos);
    // Parse "row 1: a, b, c, d. row 2: ..." back into a grid.
    std::string desc = first.substr(0, first.find('\n'));
    Grid g;
    g.rows = g.cols = 4;
    std::istringstream rows(desc);
    std::string row;
    while (std::getline(rows, row, '.')) {
      if (row.find(':') == std::string::npos) continue;
      std::istringstream cells(row.substr(row.find(':') + 1));
      std::string cell;
      while (std::getline(cells, cell, ',')) g.labels.push_back(index_of(cell.substr(1)));
    }
    ASSERT_EQ(g.labels.size(), 16u) << desc;
    g.items.assign(16, 0);
    for (size_t t = 0; t < c.turns.size(); ++t) {
      std::string q = t ? c.turns[t].human : first.substr(first.find('\n') + 1);
      std::string family = q.rfind("What is", 0) == 0   ? "identify"
                           : q.rfind("How many", 0) == 0 ? "count"
                           : q.rfind("Is there", 0) == 0 ? "exist"
                                                         : "locate";
      EXPECT_EQ(answer_from_grid(g, QA{family, q, c.turns[t].assistant}), c.turns[t].assistant) << c.id << ": " << q;
      families[family]++;
    }
  }
  EXPECT_EQ(families.size(), 4u);
}

TEST(Repro, CurriculumSpecParsesAndRefusesBadStagesByName) {
  auto c = parse_curriculum("2:identify:8:2500,4:count+exist:4:100,4:all:1:7");
  ASSERT_EQ(c.size(), 3u);
  EXPECT_EQ(c[0].grid, 2);
  EXPECT_EQ(c[0].families, std::vector<std::string>{"identify"});
  EXPECT_EQ(c[0].pool, 8);
  EXPECT_EQ(c[0].steps, 2500);
  EXPECT_EQ(c[1].families, (std::vector<std::string>{"count", "exist"}));
  EXPECT_TRUE(c[2].families.empty());  // all
  EXPECT_EQ(format_curriculum(c), "2:identify:8:2500,4:count+exist:4:100,4:all:1:7");
  EXPECT_TRUE(parse_curriculum("none").empty());
  EXPECT_TRUE(parse_curriculum("").empty());
  auto error = [](const std::string& spec) {
    try {
      parse_curriculum(spec);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_EQ(c[0].repeats, 1);
  EXPECT_LT(c[0].target, 0);  // no bar: the one schedule runs to its end
  auto r = parse_curriculum("2:identify:8:1000x6@70,4:identify:4:500@65%,4:all:1:300x3");
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].steps, 1000);
  EXPECT_EQ(r[0].repeats, 6);
  EXPECT_DOUBLE_EQ(r[0].target, 0.70);
  EXPECT_EQ(r[1].steps, 500);
  EXPECT_EQ(r[1].repeats, 1);
  EXPECT_DOUBLE_EQ(r[1].target, 0.65);
  EXPECT_EQ(r[2].repeats, 3);
  EXPECT_LT(r[2].target, 0);
  EXPECT_EQ(format_curriculum(r), "2:identify:8:1000x6@70,4:identify:4:500@65,4:all:1:300x3");
  EXPECT_LT(r[0].empty_rate, 0);  // no EMPTY field: GridVQA's default
  auto e = parse_curriculum("4:count+exist:4:1250:75,4:all:1:300x2@55:30%");
  ASSERT_EQ(e.size(), 2u);
  EXPECT_DOUBLE_EQ(e[0].empty_rate, 0.75);
  EXPECT_EQ(e[0].steps, 1250);
  EXPECT_DOUBLE_EQ(e[1].empty_rate, 0.30);
  EXPECT_DOUBLE_EQ(e[1].target, 0.55);
  EXPECT_EQ(format_curriculum(e), "4:count+exist:4:1250:75,4:all:1:300x2@55:30");
  // Per family: identify on the stage's grids, exist and locate on 75%-empty ones.
  auto m = parse_curriculum("4:identify+exist/75+locate/75%:4:1250x2@60");
  ASSERT_EQ(m.size(), 1u);
  EXPECT_EQ(m[0].families, (std::vector<std::string>{"identify", "exist", "locate"}));
  ASSERT_EQ(m[0].family_empty.size(), 3u);
  EXPECT_LT(m[0].family_empty[0], 0);
  EXPECT_DOUBLE_EQ(m[0].family_empty[1], 0.75);
  EXPECT_DOUBLE_EQ(m[0].family_empty[2], 0.75);
  EXPECT_EQ(format_curriculum(m), "4:identify+exist/75+locate/75:4:1250x2@60");
  EXPECT_TRUE(e[0].family_empty.empty());  // no NAME/EMPTY: every family on the stage's grids
  EXPECT_NE(error("4:identify+exist/100:4:10").find("a family's EMPTY"), std::string::npos);
  EXPECT_NE(error("4:exist/:4:10").find("a family's EMPTY"), std::string::npos);
  EXPECT_NE(error("4:dress/50:4:10").find("unknown question family 'dress'"), std::string::npos);
  EXPECT_NE(error("4:all:4:100:100").find("EMPTY"), std::string::npos);
  EXPECT_NE(error("4:all:4:100:lots").find("EMPTY"), std::string::npos);
  EXPECT_NE(error("4:all:4:100:50:1").find("GRID:FAMILIES:POOL:STEPS"), std::string::npos);
  EXPECT_EQ(format_curriculum(parse_curriculum(format_curriculum(ReproOptions{}.curriculum))),
            format_curriculum(ReproOptions{}.curriculum));  // the default survives --help's round trip
  EXPECT_NE(error("2:identify:8").find("GRID:FAMILIES:POOL:STEPS"), std::string::npos);
  EXPECT_NE(error("2:identify:8:100x0").find("REPEATS"), std::string::npos);
  EXPECT_NE(error("2:identify:8:100x").find("REPEATS"), std::string::npos);
  EXPECT_NE(error("2:identify:8:100@101").find("TARGET"), std::string::npos);
  EXPECT_NE(error("2:identify:8:100@high").find("TARGET"), std::string::npos);
  EXPECT_NE(error("2:identify:8:x3").find("STEPS"), std::string::npos);
  EXPECT_NE(error("2:identify:8:2500,2:colour:8:10").find("unknown question family 'colour'"), std::string::npos);
  EXPECT_NE(error("2:identify:8:2500,2:colour:8:10").find("'2:colour:8:10'"), std::string::npos);
  EXPECT_NE(error("9:all:8:10").find("GRID"), std::string::npos);
  EXPECT_NE(error("2:all:8:ten").find("STEPS"), std::string::npos);
  EXPECT_NE(error("2:all:8x:10").find("POOL"), std::string::npos);
  EXPECT_NE(error("2:all:0:10").find("POOL"), std::string::npos);
  EXPECT_NE(error("2:count+count:8:10").find("given twice"), std::string::npos);
}

TEST(LlavaData, SplitTurnsMakesEveryTurnASampleWithItsImage) {
  std::vector<Conversation> convs{
      {"a", "images/a.png", {{"<image>\nWhat is in row 1, column 2?", "bag"}, {"How many bags are there?", "1"},
                             {"Is there a dress?", "no"}}},
      {"b", "images/b.png", {{"Where is the bag?\n<image>", "row 2, column 1"}}},
      {"t", "", {{"Hello", "hi"}, {"Again", "hi again"}}}};
  auto s = split_turns(convs);
  ASSERT_EQ(s.size(), 6u);
  EXPECT_EQ(s[0].id, "a#0");
  EXPECT_EQ(s[2].id, "a#2");
  for (int i = 0; i < 3; ++i) {
    ASSERT_EQ(s[i].turns.size(), 1u);
    EXPECT_EQ(s[i].image, "images/a.png");
    EXPECT_EQ(s[i].turns[0].human.rfind("<image>\n", 0), 0u) << s[i].turns[0].human;
    EXPECT_EQ(s[i].turns[0].human.find("<image>", 1), std::string::npos);  // exactly one placeholder
    EXPECT_EQ(s[i].turns[0].human.substr(8), convs[0].turns[i].human.substr(i == 0 ? 8 : 0));
    EXPECT_EQ(s[i].turns[0].assistant, convs[0].turns[i].assistant);
  }
  EXPECT_EQ(s[3].id, "b");  // already one turn: unchanged, placeholder where it was
  EXPECT_EQ(s[3].turns[0].human, "Where is the bag?\n<image>");
  EXPECT_EQ(s[4].id, "t#0");  // text only: no placeholder added
  EXPECT_EQ(s[5].turns[0].human, "Again");
  EXPECT_EQ(s[5].turns[0].assistant, "hi again");
}

TEST(LlavaData, SplittingNeverLeavesASecondImageTag) {
  // Found by fuzz_llava: erasing the tag from "<imag<image>e>" joined the text around it into a
  // new "<image>", and the split turn had two placeholders for one image.
  std::vector<Conversation> convs{
      {"a", "x.png", {{"<imag<image>e>\nWhat is in row 1?", "bag"}, {"And row 2?", "dress"}}}};
  auto s = split_turns(convs);
  ASSERT_EQ(s.size(), 2u);
  for (auto& c : s) {
    const std::string& h = c.turns[0].human;
    EXPECT_EQ(h.rfind("<image>\n", 0), 0u) << h;
    EXPECT_EQ(h.find("<image>", 1), std::string::npos) << h;
  }
  EXPECT_EQ(s[0].turns[0].human, "<image>\n\nWhat is in row 1?");
  EXPECT_EQ(s[1].turns[0].human, "<image>\nAnd row 2?");
}

// Every answer's boxes are the cells it rests on, recomputed here from the grid and the question:
// the asked cell (identify), every cell of the asked class (count, exist: none when absent), the
// class's one cell (locate). train.json carries them on the gpt turns.
TEST(GridVqa, BoxesAreTheCellsEachAnswerRestsOn) {
  auto labels = read_idx_labels(kSource + "/t10k-labels-idx1-ubyte.gz");
  Rng rng(9);
  for (int i = 0; i < 200; ++i) {
    Grid g = random_grid(4, 0.3, labels, rng);
    for (auto& qa : ask_balanced(g, 4, rng)) {
      std::vector<int> expect;
      if (qa.family == "identify") {
        int r = 0, c = 0;
        ASSERT_EQ(std::sscanf(qa.question.c_str(), "What is in row %d, column %d?", &r, &c), 2);
        expect = {(r - 1) * 4 + (c - 1)};
      } else {
        const auto& names = qa.family == "count" ? kFashionPlurals : kFashionClasses;
        int cls = -1;
        for (int k = 0; k < 10; ++k)  // the longest name the question holds ("t-shirt" in no other)
          if (qa.question.find(" " + names[k] + (qa.family == "count" ? " " : "?")) != std::string::npos) cls = k;
        ASSERT_GE(cls, 0) << qa.question;
        for (int cell = 0; cell < 16; ++cell)
          if (g.labels[cell] == cls) expect.push_back(cell);
        if (qa.family == "count") EXPECT_EQ(std::to_string(expect.size()), qa.answer);
        if (qa.family == "exist") EXPECT_EQ(expect.empty() ? "no" : "yes", qa.answer);
        if (qa.family == "locate") {
          ASSERT_EQ(expect.size(), 1u);
          EXPECT_EQ("row " + std::to_string(expect[0] / 4 + 1) + ", column " + std::to_string(expect[0] % 4 + 1), qa.answer);
        }
      }
      EXPECT_EQ(qa.cells, expect) << qa.question;
    }
  }
  EXPECT_EQ(cell_box(4, 4, 6), (std::array<double, 4>{0.5, 0.25, 0.75, 0.5}));  // row 2, column 3
  auto dir = temp_dir("gq_boxes");
  build_gridvqa(small_options(dir, 3));
  int grounded = 0;
  for (auto& c : load_llava_json(dir + "/train.json"))
    for (auto& t : c.turns) {
      EXPECT_TRUE(t.grounded);
      grounded += !t.boxes.empty();
    }
  EXPECT_GT(grounded, 30);  // of 48 answers; exist "no" and count "0" have none
}

TEST(LlavaData, MalformedBoxesAreNamed) {
  auto dir = temp_dir("boxes_bad");
  auto error_of = [&](const std::string& boxes) -> std::string {
    std::ofstream(dir + "/d.json") << R"([{"id": "b7", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a", "boxes": )" + boxes + "}]}]";
    try {
      load_llava_json(dir + "/d.json");
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_EQ(error_of("[[0.1, 0.2, 0.3, 0.4]]"), "");
  for (const char* bad : {"3", "[[0.1, 0.2, 0.3]]", "[[0.1, 0.2, 0.3, 1.5]]", "[[0.5, 0.2, 0.3, 0.4]]", R"([["a", 0, 1, 1]])"}) {
    auto e = error_of(bad);
    EXPECT_NE(e.find("b7"), std::string::npos) << bad;
    EXPECT_NE(e.find("'boxes'"), std::string::npos) << bad << ": " << e;
  }
}

TEST(Repro, OptionTableDeclaresEveryFlagOnceAndItsQuickPreset) {
  // The quick preset the table writes: the values `--quick` has run with since it existed.
  const ReproOptions q = ReproOptions::quick(), d;
  EXPECT_EQ(q.out, "runs/repro-quick");
  EXPECT_EQ(q.train_images, 400);
  EXPECT_EQ(q.test_images, 50);
  EXPECT_EQ(q.steps, 60);
  EXPECT_EQ(q.vision_steps, 40);
  EXPECT_EQ(q.vision_images, 0);
  EXPECT_EQ(q.bench_repeats, 1);
  EXPECT_EQ(q.timing_rounds, 2);
  EXPECT_EQ(q.timing_steps, 4);
  EXPECT_EQ(q.bench_gen, (std::vector<int>{2, 32}));
  EXPECT_EQ(q.registers, std::vector<int>{8});
  EXPECT_EQ(q.summary_layers, std::vector<int>{2});
  EXPECT_EQ(format_curriculum(q.curriculum), "4:identify:4:150");
  EXPECT_EQ(q.curriculum_images, 600);
  EXPECT_DOUBLE_EQ(q.lr, 1e-3);
  EXPECT_EQ(q.batch_size, d.batch_size);  // what the preset does not name keeps its default
  EXPECT_EQ(q.pools, d.pools);
  // Each flag once; every row's quick value passes its own check.
  std::set<std::string> flags;
  for (const auto& row : repro_options()) {
    EXPECT_TRUE(flags.insert(row.flag).second) << row.flag << " twice";
    EXPECT_EQ(row.flag.rfind("--", 0), 0u) << row.flag;
    EXPECT_FALSE(row.help.empty()) << row.flag;
  }
  EXPECT_GE(flags.size(), 37u);  // every option repro had when the table replaced its three lists
  // The checks the table declares, refused by flag name.
  auto row = [](const std::string& flag) {
    for (const auto& r : repro_options())
      if (r.flag == flag) return r;
    throw Error("no row " + flag);
  };
  ReproOptions o;
  EXPECT_NE(error_of([&] { set_repro_option(o, row("--steps"), "0"); }).find("--steps 0"), std::string::npos);
  EXPECT_NE(error_of([&] { set_repro_option(o, row("--lr"), "-1"); }).find("positive"), std::string::npos);
  EXPECT_NE(error_of([&] { set_repro_option(o, row("--register-mask"), "x"); }).find("--register-mask"), std::string::npos);
  EXPECT_NE(error_of([&] { set_repro_option(o, row("--registers"), "2,x"); }).find("--registers"), std::string::npos);
  EXPECT_NE(error_of([&] { set_repro_option(o, row("--batch-size"), "2.5"); }).find("integer"), std::string::npos);
  set_repro_option(o, row("--registers"), "1,4,16");
  EXPECT_EQ(o.registers, (std::vector<int>{1, 4, 16}));
  set_repro_option(o, row("--vision-counts"), "true");
  EXPECT_TRUE(o.vision_counts);
}
