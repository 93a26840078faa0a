// Data: Fashion-MNIST (IDX) reader, the GridVQA builder, LLaVA's JSON / JSONL formats.
#pragma once
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "victor/image.h"
#include "victor/llava_data.h"
#include "victor/tokenizer.h"

namespace victor {

// --- Fashion-MNIST ---
struct IdxImages {
  int count = 0, rows = 0, cols = 0;
  std::vector<uint8_t> pixels;  // count * rows * cols
};
std::string read_gzip(const std::string& path);  // plain files pass through
IdxImages read_idx_images(const std::string& path);
std::vector<uint8_t> read_idx_labels(const std::string& path);

extern const std::vector<std::string> kFashionClasses;  // "t-shirt", "trouser", ...
extern const std::vector<std::string> kQuestionFamilies;  // "identify", "count", "exist", "locate"
extern const std::vector<std::string> kFashionPlurals;  // "t-shirts", "trousers", ...

// --- GridVQA ---
struct GridVqaOptions {
  std::string source_dir = "/usr/share/datasets/fashion-mnist";
  std::string out_dir = "data/gridvqa";
  int grid = 4;
  int train_images = 2000;
  int test_images = 300;
  int questions_per_image = 4;  // train: one multi-turn conversation; test: one line each
  double empty_rate = 0.3;
  uint64_t seed = 0;
  // Question families asked, in turn from a random start (a curriculum can ask one family).
  std::vector<std::string> families = kQuestionFamilies;
  // text.json: the same questions about grids written out as text (no image), the language
  // model's own pretraining corpus, as LLaVA starts from a pretrained Vicuna. Labels only, so
  // cheap; drawn from the train split with its own random stream (the other files do not change).
  int text_grids = 20000;
  // The scattered layout (GridVQA-HR, for LLaVA-NeXT): each image is a canvas of rows x cols cells
  // of cell_pixels, its shape drawn from `canvases` (non-square ones included); every item is
  // scaled to a random side in [item_min, item_max] pixels and centred at a random point of its
  // cell, so items sit off the patch grid, some across patch and crop boundaries, and the
  // downscaled base view blurs them. Questions name the cell an item's centre lies in. `grid` is
  // not used.
  bool scattered = false;
  std::vector<std::pair<int, int>> canvases{{4, 4}, {2, 4}, {4, 2}, {2, 6}, {6, 2}};
  int cell_pixels = 56, item_min = 14, item_max = 40;
};

// Where an item is drawn: a side x side square at (x, y) pixels of the canvas.
struct Placement {
  int x = 0, y = 0, side = 0;
};

struct Grid {
  int rows = 0, cols = 0;
  std::vector<int> labels;  // row-major, -1 = empty
  std::vector<int> items;   // index into the split's images, -1 = empty
  // Scattered layout: one placement per cell (side 0 where empty) on a canvas of rows x cols cells
  // of cell_pixels; empty = the aligned layout (each item fills its 28-pixel cell).
  std::vector<Placement> places{};
  int cell_pixels = 28;
  int cells() const { return rows * cols; }
  int width() const { return cols * cell_pixels; }
  int height() const { return rows * cell_pixels; }
};

struct QA {
  std::string family, question, answer;
  std::vector<int> cells{};  // the cells the answer rests on (row-major): written as the turn's boxes
};

// Small deterministic generator (same numbers on every platform).
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed) { s_ = next() ^ 0x632BE59BD9B4E019ull; }
  uint64_t next();
  int uniform(int n);  // [0, n)
  double unit();       // [0, 1)
 private:
  uint64_t s_;
};

// A size x size grid in the aligned layout.
Grid random_grid(int size, double empty_rate, const std::vector<uint8_t>& labels, Rng& rng);
// A rows x cols canvas in the scattered layout (GridVqaOptions::scattered).
Grid random_scattered_grid(int rows, int cols, const GridVqaOptions& opt, const std::vector<uint8_t>& labels,
                           Rng& rng);
// The image: aligned items copied into their cells; scattered items resampled to their side
// (bilinear at half-pixel centres, torch's align_corners=false without antialiasing) and drawn by maximum, so
// an overlapping neighbour never erases an item.
Image render_grid(const Grid& g, const IdxImages& items);
// One question of `family` about the grid ("identify", "count", "exist", "locate"); empty
// answer when the family has no valid question (locate with no unique item).
QA ask(const Grid& g, const std::string& family, Rng& rng);
// Up to n distinct questions, the families taken in turn from a random start.
std::vector<QA> ask_balanced(const Grid& g, int n, Rng& rng,
                             const std::vector<std::string>& families = kQuestionFamilies);
// Cell `cell` of a rows x cols grid as a normalized box (x0, y0, x1, y1); doubles, so that
// train.json writes 1/3 as 0.3333333333333333.
std::array<double, 4> cell_box(int rows, int cols, int cell);
// The normalized box of the item in `cell`: its cell (aligned layout, or an empty cell) or its
// placement (scattered).
std::array<double, 4> item_box(const Grid& g, int cell);
// "row 1: sneaker, nothing, bag, coat. row 2: ..." (the pretraining caption).
std::string describe_grid(const Grid& g);
// Recomputes the answer from the grid: the invariant the tests check.
std::string answer_from_grid(const Grid& g, const QA& qa);

struct GridVqaSummary {
  int train_images = 0, test_images = 0, train_questions = 0, test_questions = 0, text_grids = 0;
};
GridVqaSummary build_gridvqa(const GridVqaOptions& opt,
                             const std::function<void(int, int)>& progress = {});
// Every sentence GridVQA can produce, for training a tokenizer.
std::vector<std::string> gridvqa_corpus();

}  // namespace victor
