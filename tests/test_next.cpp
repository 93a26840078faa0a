// LLaVA-NeXT: AnyRes geometry against hand-worked cases, the packing against transformers'
// formulation, every reducer's incremental decode, Victor off, the cap, and a llava-hf folder.
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "helpers.h"
#include "victor/files.h"
#include "victor/generate.h"
#include "victor/image.h"
#include "victor/safetensors.h"
#include "victor/train.h"

using namespace victor;
using namespace victor::test;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

const std::vector<Pinpoint> kV16 = {{336, 672}, {672, 336}, {672, 672}, {1008, 336}, {336, 1008}};

// The tiny test shape with AnyRes (28-pixel views of 4 x 4 patches; llava-v1.6's pinpoints / 12).
ModelConfig next_config(int registers = 0, int summary_layers = -1) {
  ModelConfig c = tiny_config(registers, summary_layers);
  c.image_grid_pinpoints = preset_config("llava-next-tiny").image_grid_pinpoints;
  c.preprocess.pad_to_square = false;
  c.validate();
  return c;
}


PromptInput next_prompt(const ModelConfig& c, const std::vector<Image>& images) {
  PromptInput p;
  p.ids = {1, 5, 6};
  for (auto& img : images) {
    p.ids.push_back(c.image_token_index);
    add_image(p, img, c);
  }
  for (int64_t t : {7, 8, 9, 10}) p.ids.push_back(t);
  return p;
}

// LlavaNextProcessor._get_number_of_features, transcribed: the <image> tokens the processor expands
// one image into (base view without the class token, unpadded crops, one newline per row).
int64_t processor_image_tokens(int orig_h, int orig_w, const std::vector<Pinpoint>& pins, int size, int patch) {
  const Pinpoint best = select_best_resolution(orig_h, orig_w, pins);
  const int scale_h = best[0] / size, scale_w = best[1] / size;
  const int patches = size / patch;
  int cur_h = patches * scale_h, cur_w = patches * scale_w;
  const double original_aspect = double(orig_w) / orig_h, current_aspect = double(cur_w) / cur_h;
  if (original_aspect > current_aspect) {
    const int new_h = int(std::floor(std::nearbyint(orig_h * (double(cur_w) / orig_w) * 1e7) / 1e7));
    cur_h -= ((cur_h - new_h) / 2) * 2;
  } else {
    const int new_w = int(std::floor(std::nearbyint(orig_w * (double(cur_h) / orig_h) * 1e7) / 1e7));
    cur_w -= ((cur_w - new_w) / 2) * 2;
  }
  return int64_t(cur_h) * cur_w + cur_h + patches * patches;
}

}  // namespace

TEST(Next, BestResolutionOnHandWorkedCases) {
  // 640 x 480: 672 x 672 keeps all 307,200 pixels (672 x 336 keeps 448 x 336 of them).
  EXPECT_EQ(select_best_resolution(480, 640, kV16), (Pinpoint{672, 672}));
  EXPECT_EQ(select_best_resolution(640, 480, kV16), (Pinpoint{672, 672}));
  // A 336 x 336 image: 336 x 672 and 672 x 336 both keep it all and waste as much: the earlier wins.
  EXPECT_EQ(select_best_resolution(336, 336, kV16), (Pinpoint{336, 672}));
  EXPECT_EQ(select_best_resolution(336, 336, {{672, 336}, {336, 672}}), (Pinpoint{672, 336}));
  // Extreme aspect ratios: a 2000 x 100 strip takes 1 x 3 crops (1008 x 50 kept), a 100 x 2000 one 3 x 1.
  EXPECT_EQ(select_best_resolution(100, 2000, kV16), (Pinpoint{336, 1008}));
  EXPECT_EQ(select_best_resolution(2000, 100, kV16), (Pinpoint{1008, 336}));
  // A tiny image fits every pinpoint whole: the least waste (the first 336 x 672) wins.
  EXPECT_EQ(select_best_resolution(3, 5, kV16), (Pinpoint{336, 672}));
  // get_patch_output_size rounds up: 143 x 97 into 672 x 336 -> 336 high, ceil(143 * 336 / 97) = 496 wide.
  EXPECT_EQ(patch_output_size(97, 143, {336, 672}), (std::array<int, 2>{336, 496}));
  EXPECT_EQ(patch_output_size(480, 640, {672, 672}), (std::array<int, 2>{504, 672}));
}

TEST(Next, UnpaddingOnHandWorkedCases) {
  // 640 x 480 on a 48 x 48 grid: 36 rows show the image, 6 of padding above and below.
  GridRegion r = unpad_region(48, 48, 480, 640);
  EXPECT_EQ(r.top, 6);
  EXPECT_EQ(r.height, 36);
  EXPECT_EQ(r.left, 0);
  EXPECT_EQ(r.width, 48);
  r = unpad_region(48, 48, 640, 480);  // tall: columns trimmed
  EXPECT_EQ(r.left, 6);
  EXPECT_EQ(r.width, 36);
  EXPECT_EQ(r.height, 48);
  // Odd padding: 201 x 100 -> 23.88 rows, int() = 23, padding (48 - 23) // 2 = 12 each side: 24 rows
  // stay (transformers slices [12 : 48 - 12]).
  r = unpad_region(48, 48, 100, 201);
  EXPECT_EQ(r.top, 12);
  EXPECT_EQ(r.height, 24);
  // round(x, 7) before int(): 3 x 7 on a 24 x 48 grid (aspect 2.333 > 2): 48 * 3 / 7 = 20.571.. -> 20,
  // padding 2: 20 rows.
  r = unpad_region(24, 48, 3, 7);
  EXPECT_EQ(r.height, 20);
  // A square image on a square grid keeps everything.
  r = unpad_region(48, 48, 500, 500);
  EXPECT_EQ(r.height, 48);
  EXPECT_EQ(r.width, 48);
  // Rows given to the language model by llava-v1.6 (24 x 24 features per view).
  EXPECT_EQ(next_packed_rows({480, 640, 2, 2}, 24), 576 + 36 * 49);  // 2,340
  EXPECT_EQ(next_packed_rows({672, 672, 2, 2}, 24), 576 + 48 * 49);  // 2,928: five views' 2,880 + 48 newlines
  EXPECT_EQ(next_packed_rows({100, 100, 0, 0}, 24), 577);           // base view alone + one newline
}

// Grounding on NeXT: each packed row's centre in the image, in pack_image's order. A 56 x 28 image on
// the tiny shape: base view 4 x 4, then the 1 x 2 crop grid (4 x 8 features, nothing to unpad) with a
// newline after each of its 4 rows: 16 + 4 x 9 = 52 rows.
TEST(Next, RowCentresFollowThePackingAndBoxesPickTheirRows) {
  ModelConfig c = next_config();
  ImageLayout l = image_layout(56, 28, c);
  ASSERT_EQ(l.grid_rows, 1);
  ASSERT_EQ(l.grid_cols, 2);
  torch::Tensor xy = next_row_centres(c, l);
  ASSERT_EQ(xy.size(0), 52);
  auto at = [&](int i) { return std::pair{xy[i][0].item<float>(), xy[i][1].item<float>()}; };
  EXPECT_EQ(at(0), std::pair(0.125f, 0.125f));      // base view, patch (0, 0) of 4 x 4
  EXPECT_EQ(at(6), std::pair(0.625f, 0.375f));      // base view, patch (1, 2)
  EXPECT_EQ(at(16), std::pair(0.0625f, 0.125f));    // crop grid row 0, column 0 of 8
  EXPECT_EQ(at(23), std::pair(0.9375f, 0.125f));    // row 0, column 7
  EXPECT_EQ(at(24), std::pair(-1.0f, -1.0f));       // its newline
  EXPECT_EQ(at(25), std::pair(0.0625f, 0.375f));    // row 1, column 0
  // Unpadded: a wide 90 x 20 image keeps only the crop rows that show it; every layout's centres
  // match its packed rows.
  for (auto [w, h] : {std::pair{90, 20}, {20, 90}, {28, 28}, {50, 30}, {7, 61}}) {
    ImageLayout li = image_layout(w, h, c);
    EXPECT_EQ(next_row_centres(c, li).size(0), next_packed_rows(li, 4)) << w << "x" << h;
  }
  // A box over the image's left half: its weight lies on the base rows and the crop rows left of
  // x = 0.5 (8 + 16 of them, one unit spread over them), none on the right or on a newline.
  torch::Tensor wts = box_token_weights({Box{0.f, 0.f, 0.5f, 1.f}}, xy);
  int on = 0;
  for (int i = 0; i < 52; ++i) {
    const auto [x, y] = at(i);
    const bool inside = x >= 0 && x < 0.5f;
    EXPECT_EQ(wts[i].item<float>() > 0, inside) << i;
    on += inside;
  }
  EXPECT_EQ(on, 8 + 16);
  EXPECT_NEAR(wts.sum().item<float>(), 1.f, 1e-6);

  // Pooled 2 x 2 (each view's 4 x 4 grid becomes 2 x 2, packed and unpadded at that resolution):
  // every pooled row's centre is the mean of the centres of the patches it averages, and the
  // centres count the model's own rows for every layout.
  ModelConfig cp = next_config();
  cp.reducer = Reducer::pool({2});
  cp.validate();
  ImageLayout lp = image_layout(56, 28, cp);
  torch::Tensor pooled = next_row_centres(cp, lp);
  ASSERT_EQ(pooled.size(0), 4 + 2 * 5);  // base 2 x 2; crop grid 2 x 4 and a newline per row
  for (int r = 0; r < 2; ++r)
    for (int col = 0; col < 2; ++col) {  // base view: patches (2r..2r+1, 2col..2col+1) of xy
      auto mean = (xy[(2 * r) * 4 + 2 * col] + xy[(2 * r) * 4 + 2 * col + 1] + xy[(2 * r + 1) * 4 + 2 * col] +
                   xy[(2 * r + 1) * 4 + 2 * col + 1]) / 4;
      EXPECT_TRUE(torch::allclose(pooled[r * 2 + col], mean)) << r << "," << col;
    }
  for (int r = 0; r < 2; ++r) {
    for (int col = 0; col < 4; ++col) {  // crop grid: pooled (r, col) averages rows 2r..2r+1, columns 2col..2col+1
      const int up = 16 + (2 * r) * 9 + 2 * col, down = up + 9;
      auto mean = (xy[up] + xy[up + 1] + xy[down] + xy[down + 1]) / 4;
      EXPECT_TRUE(torch::allclose(pooled[4 + r * 5 + col], mean)) << r << "," << col;
    }
    EXPECT_EQ(pooled[4 + r * 5 + 4][0].item<float>(), -1.f);  // the newline
  }
  for (auto [w, h] : {std::pair{90, 20}, {20, 90}, {28, 28}, {50, 30}, {7, 61}}) {
    ImageLayout li = image_layout(w, h, cp);
    EXPECT_EQ(next_row_centres(cp, li).size(0), image_rows(cp, li)) << w << "x" << h;
  }
}

TEST(Next, PackedLengthEqualsTheProcessorsImageTokenCount) {
  // For many sizes (llava-v1.6's geometry: 336-pixel views of 24 x 24 patches), the rows the packing
  // gives equal the <image> tokens LlavaNextProcessor expands to.
  ModelConfig c = preset_config("llava-next-7b");
  int checked = 0;
  for (int h : {1, 3, 97, 336, 480, 500, 640, 672, 1000, 1111, 2000, 4000})
    for (int w : {1, 7, 143, 336, 480, 640, 672, 999, 1500, 3000}) {
      ImageLayout l = image_layout(w, h, c);
      ASSERT_GT(l.grid_rows, 0);
      EXPECT_EQ(next_packed_rows(l, 24), processor_image_tokens(h, w, kV16, 336, 14)) << w << "x" << h;
      ++checked;
    }
  EXPECT_EQ(checked, 120);
  // And the model's packing really gives that many rows (tiny shape: 4 x 4 patches per view).
  ModelConfig t = next_config();
  Vlm m = Vlm::random(t, 3);
  for (auto [w, h] : {std::pair{50, 30}, {30, 50}, {28, 28}, {90, 20}, {7, 61}}) {
    auto p = next_prompt(t, {random_image(w, h, 1)});
    auto e = m.encode_prompt_images({p});
    ASSERT_EQ(e.size(), 1u);
    EXPECT_EQ(e[0].size(0), processor_image_tokens(h, w, t.image_grid_pinpoints, 28, 7)) << w << "x" << h;
    EXPECT_EQ(e[0].size(0), visual_rows_of(t, p)[0]);
  }
}

TEST(Next, PackingEqualsTransformersPackImageFeatures) {
  // transformers' formulation, channel-first: view(rows, cols, h, w, d).permute(4, 0, 2, 1, 3),
  // flatten, unpad_image, newline column appended, flatten(1, 2).transpose(0, 1), base view first.
  ModelConfig c = next_config();
  Vlm m = Vlm::random(c, 4);
  for (auto [w, h] : {std::pair{50, 30}, {30, 50}, {90, 20}, {28, 28}}) {
    PromptInput p = next_prompt(c, {random_image(w, h, 2)});
    const ImageLayout l = p.layouts[0];
    torch::NoGradGuard ng;
    auto views = m.encode_images(p.pixels);  // [v,16,d]
    const int64_t side = 4, d = views.size(2);
    auto f = views.narrow(0, 1, l.views() - 1).reshape({l.grid_rows, l.grid_cols, side, side, d});
    f = f.permute({4, 0, 2, 1, 3}).contiguous().flatten(1, 2).flatten(2, 3);  // [d, H, W]
    const int64_t H = f.size(1), W = f.size(2);
    const double oa = double(w) / h, ca = double(W) / H;
    if (oa > ca) {
      const int64_t nh = int64_t(std::floor(std::nearbyint(h * (double(W) / w) * 1e7) / 1e7)), pad = (H - nh) / 2;
      f = f.slice(1, pad, H - pad);
    } else {
      const int64_t nw = int64_t(std::floor(std::nearbyint(w * (double(H) / h) * 1e7) / 1e7)), pad = (W - nw) / 2;
      f = f.slice(2, pad, W - pad);
    }
    auto nl = m.weights().image_newline.view({d, 1, 1}).expand({d, f.size(1), 1});
    f = torch::cat({f, nl}, -1).flatten(1, 2).transpose(0, 1);
    auto want = torch::cat({views[0], f}, 0);
    auto got = m.pack_image(views, l);
    ASSERT_EQ(got.sizes(), want.sizes()) << w << "x" << h;
    EXPECT_TRUE(torch::equal(got, want)) << w << "x" << h;
  }
}

TEST(Next, VisionZipPacksAsItsOwnNextCodeDoes) {
  // VisionZip's LLaVA-NeXT packing (restore_image_features_sorted): the base view's kept tokens,
  // then each crop's dominant tokens put back on the whole crop grid and read in raster order,
  // then every crop's contextual tokens; no unpadding, no newlines.
  ModelConfig c = next_config();
  c.reducer = Reducer::parse("visionzip:dominant=5,contextual=3");
  c.validate();
  Vlm m = Vlm::random(c, 12);
  for (auto [w, h] : {std::pair{50, 18}, {18, 50}, {56, 56}}) {
    PromptInput p = next_prompt(c, {random_image(w, h, 7)});
    const ImageLayout l = p.layouts[0];
    torch::NoGradGuard ng;
    VisionTrace tr;
    auto views = m.project(m.vision_features(p.pixels, &tr));  // [v,8,d]
    const int64_t side = 4, d = views.size(2), crops = l.views() - 1;
    auto grid = torch::zeros({l.grid_rows, side, l.grid_cols, side, d});
    auto mask = torch::zeros({l.grid_rows, side, l.grid_cols, side}, torch::kBool);
    for (int64_t k = 0; k < crops; ++k)
      for (int64_t j = 0; j < 5; ++j) {
        const int64_t idx = tr.dominant[1 + k][j].item<int64_t>();
        grid[k / l.grid_cols][idx / side][k % l.grid_cols][idx % side] = views[1 + k][j];
        mask[k / l.grid_cols][idx / side][k % l.grid_cols][idx % side] = true;
      }
    auto dom = grid.reshape({-1, d}).index({mask.flatten()});
    auto ctx = views.narrow(0, 1, crops).narrow(1, 5, 3).reshape({-1, d});
    auto want = torch::cat({views[0], dom, ctx}, 0);
    auto got = m.encode_prompt_images({p})[0];
    ASSERT_EQ(got.sizes(), want.sizes()) << w << "x" << h;
    EXPECT_EQ(got.size(0), int64_t(l.views()) * 8);
    EXPECT_EQ(got.size(0), visual_rows_of(c, p)[0]);
    EXPECT_TRUE(torch::allclose(got, want, 1e-6, 1e-6)) << w << "x" << h;
  }
}

TEST(Next, IncrementalDecodeEqualsFullRecomputeForEveryReducer) {
  // Three non-square images (a 2 x 1 grid, a 1 x 2 one and a 2 x 2 one unpadded), every reducer
  // NeXT runs.
  std::vector<Reducer> reducers = {Reducer::none(), Reducer::parse("victor:m=2,k=2"),
                                   Reducer::parse("victor:m=3,k=1,mask=registers_only"), Reducer::parse("fastv:k=2,keep=0.5"),
                                   Reducer::parse("pool:2"), Reducer::parse("visionzip:dominant=5,contextual=3")};
  for (const Reducer& r : reducers) {
    ModelConfig c = next_config();
    c.reducer = r;
    c.validate();
    Vlm m = Vlm::random(c, 5);
    auto p = next_prompt(c, {random_image(18, 50, 3), random_image(50, 18, 4), random_image(60, 31, 5)});
    ASSERT_EQ(p.layouts.size(), 3u);
    EXPECT_EQ(p.layouts[0].grid_rows, 2);
    EXPECT_EQ(p.layouts[0].grid_cols, 1);
    EXPECT_EQ(p.layouts[1].grid_rows, 1);
    EXPECT_EQ(p.layouts[1].grid_cols, 2);
    EXPECT_EQ(p.layouts[2].views(), 5);
    SCOPED_TRACE(r.spec());
    check_incremental_equals_full(m, p, 5);
  }
}

TEST(Next, OneAtATimePrefillEqualsTheJointBatch) {
  // Images of three sizes (so the joint batch pads rows on the left), prefilled together or one
  // request at a time into caches of their own: the same tokens and logits at every step.
  for (const std::string spec : {"none", "victor:m=2,k=2", "fastv:k=2,keep=0.5", "visionzip:dominant=5,contextual=3"}) {
    SCOPED_TRACE(spec);
    ModelConfig c = next_config();
    c.reducer = Reducer::parse(spec);
    c.validate();
    Vlm m = Vlm::random(c, 7);
    std::vector<PromptInput> rows = {next_prompt(c, {random_image(18, 50, 3)}), next_prompt(c, {random_image(60, 31, 5)}),
                                     next_prompt(c, {random_image(50, 18, 4)})};
    rows[1].ids.insert(rows[1].ids.begin() + 1, {11, 12, 13});
    SamplingOptions so;
    so.max_new_tokens = 6;
    so.keep_logits = true;
    auto joint = generate_ids(m, rows, -1, so);
    so.prefill_one_at_a_time = true;
    auto apart = generate_ids(m, rows, -1, so);
    EXPECT_EQ(joint.tokens, apart.tokens);
    EXPECT_TRUE(torch::allclose(joint.step_logits, apart.step_logits, 1e-4, 1e-4))
        << (joint.step_logits - apart.step_logits).abs().max().item<float>();
    EXPECT_EQ(joint.stats.kv_bytes_plain, apart.stats.kv_bytes_plain);
    EXPECT_EQ(joint.stats.visual_tokens, apart.stats.visual_tokens);
  }
}

TEST(Next, VictorOffEqualsPlainNextExactly) {
  Vlm plain = Vlm::random(next_config(), 6);
  Vlm had = Vlm::random(next_config(3, 2), 6);  // registers declared last: the same other weights
  auto p = next_prompt(plain.config(), {random_image(45, 25, 5)});
  EXPECT_FALSE(torch::equal(last_logits(plain, {p}), last_logits(had, {p})));
  // m = 0 and k past the last layer: the plain model, bit for bit.
  had.set_reducer(Reducer::victor({0, 4, RegisterMask::Causal}), 0, /*replace_registers=*/true);
  EXPECT_TRUE(torch::equal(last_logits(plain, {p}), last_logits(had, {p})));
  // And the visual rows Victor drops include the newlines: after layer k only text and registers.
  Vlm v = Vlm::random(next_config(2, 1), 6);
  ForwardTrace trace;
  torch::NoGradGuard ng;
  v.forward(v.assemble({p}, true), nullptr, &trace);
  const int64_t text = int64_t(p.ids.size()) - 1;
  EXPECT_EQ(trace.tokens_per_layer[0], text + visual_rows_of(v.config(), p)[0] + 2);
  EXPECT_EQ(trace.tokens_per_layer[1], text + 2);
}

TEST(Next, TheCapChoosesFewerCrops) {
  ModelConfig c = preset_config("llava-next-7b");
  EXPECT_EQ(image_layout(640, 480, c).views(), 5);
  c.preprocess.max_crops = 2;
  ImageLayout l = image_layout(640, 480, c);  // 672 x 336 is the best of the two-crop pinpoints
  EXPECT_EQ(l.grid_rows, 1);
  EXPECT_EQ(l.grid_cols, 2);
  c.preprocess.max_crops = 0;
  // 2 x 2 gives 2,340 rows; 1 x 2 gives 576 + 24 x (32 + 1) = 1,368 (unpadded to 32 of 48 columns).
  c.preprocess.max_image_tokens = 1500;
  l = image_layout(640, 480, c);
  EXPECT_EQ(l.views(), 3);
  EXPECT_EQ(next_packed_rows(l, 24), 1368);
  c.preprocess.max_image_tokens = 1300;  // 2 x 1 fits: 576 + 18 x 25 = 1,026 (18 of 48 rows show the image)
  l = image_layout(640, 480, c);
  EXPECT_EQ(l.grid_rows, 2);
  EXPECT_EQ(next_packed_rows(l, 24), 1026);
  c.preprocess.max_image_tokens = 1000;  // below every pinpoint: the base view alone (577 rows)
  l = image_layout(640, 480, c);
  EXPECT_EQ(l.views(), 1);
  EXPECT_EQ(next_packed_rows(l, 24), 577);
  c.preprocess.max_image_tokens = 500;  // below one base view
  EXPECT_NE(error_of([&] { image_layout(640, 480, c); }).find("--max-image-tokens 500"), std::string::npos);
  // The stats see the capped count: fewer rows, less KV.
  ModelConfig t = next_config();
  Vlm m = Vlm::random(t, 7);
  auto p = next_prompt(t, {random_image(56, 56, 6)});
  m.mutable_config().preprocess.max_crops = 1;
  auto capped = next_prompt(m.config(), {random_image(56, 56, 6)});
  EXPECT_EQ(p.layouts[0].views(), 5);
  EXPECT_EQ(capped.layouts[0].views(), 1);  // no pinpoint of the tiny shape has a single crop
  SamplingOptions o;
  o.max_new_tokens = 2;
  auto full = generate_ids(Vlm::random(t, 7), {p}, -1, o), cut = generate_ids(m, {capped}, -1, o);
  EXPECT_EQ(full.stats.visual_tokens, processor_image_tokens(56, 56, t.image_grid_pinpoints, 28, 7));
  EXPECT_LT(cut.stats.visual_tokens, full.stats.visual_tokens);
  EXPECT_LT(cut.stats.kv_bytes, full.stats.kv_bytes);
  EXPECT_EQ(cut.stats.kv_bytes, kv_bytes_formula(m.config(), int64_t(p.ids.size()) - 1, visual_rows_of(m.config(), capped), 1, 4));
}

TEST(Next, ConfigsAndFoldersAreRefusedByName) {
  json good = config_to_json(next_config());
  EXPECT_EQ(good["architectures"][0], "LlavaNextForConditionalGeneration");
  EXPECT_EQ(config_from_json(good, "config.json").image_grid_pinpoints, next_config().image_grid_pinpoints);
  auto refused = [&](json j) { return error_of([&] { config_from_json(j, "config.json").validate(); }); };
  json j = good;
  j.erase("image_grid_pinpoints");
  EXPECT_NE(refused(j).find("image_grid_pinpoints is missing"), std::string::npos);
  for (json bad : {json("672"), json::array(), json{{28}}, json{{0, 28}}, json{{28, -56}}, json{{"28", 56}}}) {
    j = good;
    j["image_grid_pinpoints"] = bad;
    EXPECT_NE(refused(j).find("image_grid_pinpoints"), std::string::npos) << bad.dump();
  }
  j = good;
  j["image_grid_pinpoints"] = {{28, 50}};  // not a multiple of the 28-pixel view
  EXPECT_NE(refused(j).find("multiples of vision_config.image_size"), std::string::npos);
  j = good;
  j["vision_feature_select_strategy"] = "full";
  EXPECT_NE(refused(j).find("vision_feature_select_strategy"), std::string::npos);
  j = good;
  j["model_type"] = "llava";
  EXPECT_NE(refused(j).find("contradicts"), std::string::npos);
  j = good;
  j["text_config"]["model_type"] = "mistral";
  j["text_config"]["max_position_embeddings"] = 32768;
  j["text_config"]["sliding_window"] = 4096;
  EXPECT_NE(refused(j).find("sliding_window 4096"), std::string::npos);
  j["text_config"].erase("sliding_window");  // MistralConfig's default window is 4096 too
  EXPECT_NE(refused(j).find("sliding_window"), std::string::npos);
  j["text_config"]["sliding_window"] = nullptr;  // none: Mistral's math is LLaMA's with GQA
  EXPECT_EQ(refused(j), "");
  j = good;
  j["token_reducer"] = "resampler:latents=4";
  EXPECT_NE(refused(j).find("not implemented on LLaVA-NeXT"), std::string::npos);
  // A LLaVA-1.5 config with pinpoints is a contradiction, not a silent NeXT.
  json l15 = config_to_json(tiny_config());
  l15["image_grid_pinpoints"] = {{28, 56}};
  EXPECT_NE(refused(l15).find("belongs to LLaVA-NeXT"), std::string::npos);

  // A folder without image_newline, or whose processor's pinpoints differ from config.json's.
  auto dir = temp_dir("next_refuse");
  Vlm m = Vlm::random(next_config(), 8);
  m.save(dir);
  json proc = json::parse(read_file(dir + "/preprocessor_config.json", FileKind::Json));
  EXPECT_EQ(proc["image_processor_type"], "LlavaNextImageProcessor");
  proc["image_grid_pinpoints"] = {{28, 56}};
  write_file_atomic(dir + "/preprocessor_config.json", proc.dump());
  EXPECT_NE(error_of([&] { Vlm::load(dir); }).find("differ from config.json"), std::string::npos);
  m.save(dir);
  SafetensorsFile f(dir + "/model.safetensors");
  std::vector<std::pair<std::string, torch::Tensor>> ts;
  for (auto& [n, i] : f.tensors())
    if (n != "image_newline") ts.emplace_back(n, f.load(n).clone());
  auto dir2 = temp_dir("next_refuse2");
  save_checkpoint_tensors(dir2, ts);
  fs::copy(dir + "/config.json", dir2 + "/config.json");
  EXPECT_NE(error_of([&] { Vlm::load(dir2); }).find("image_newline"), std::string::npos);
}

TEST(Next, LlavaHfFolderLoadsUnconvertedAndGenerates) {
  // The 2025 hub layout (model.language_model.*, model.vision_tower.*, model.image_newline,
  // lm_head), sharded, as transformers' LlavaNextForConditionalGeneration saves it; then bf16.
  auto dir = temp_dir("next_hf");
  ModelConfig c = next_config();
  Vlm m = Vlm::random(c, 9);
  m.save(dir);
  const auto ts = tensors_in_2025_layout(dir);
  auto hf = temp_dir("next_hf2");
  save_checkpoint_tensors(hf, ts, 100000);
  fs::copy(dir + "/config.json", hf + "/config.json");
  fs::copy(dir + "/preprocessor_config.json", hf + "/preprocessor_config.json");
  Vlm l = Vlm::load(hf);
  ASSERT_TRUE(l.config().is_next());
  auto p = next_prompt(c, {random_image(70, 33, 10)});
  EXPECT_TRUE(torch::equal(last_logits(m, {p}), last_logits(l, {p})));
  SamplingOptions o;
  o.max_new_tokens = 4;
  o.ignore_eos = true;
  auto a = generate_ids(m, {p}, -1, o), b = generate_ids(l, {p}, -1, o);
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.tokens[0].size(), 4u);
  // bf16 and int8 storage round-trip through save/load and still generate.
  for (auto dt : {WeightDType::BF16, WeightDType::Int8}) {
    Vlm q(l);
    q.set_weight_dtype(dt);
    auto qd = temp_dir(std::string("next_q") + to_string(dt));
    q.save(qd);
    Vlm ql = Vlm::load(qd);
    EXPECT_EQ(ql.config().weight_dtype, dt);
    EXPECT_TRUE(ql.config().is_next());
    EXPECT_TRUE(torch::equal(last_logits(q, {p}), last_logits(ql, {p}))) << to_string(dt);
    EXPECT_EQ(generate_ids(ql, {p}, -1, o).tokens[0].size(), 4u);
  }
}

TEST(Next, TrainingOverfitsAFewPackedImages) {
  // The trainer's forward and backward through packed NeXT images (plain and Victor): a few
  // samples are learned, so gradients reach every part through the packing and the newlines.
  for (int k : {-1, 2}) {
    ModelConfig c = next_config(k < 0 ? 0 : 3, k);
    Vlm m = Vlm::random(c, 13);
    std::vector<TrainSample> samples;
    for (int i = 0; i < 3; ++i) {
      TrainSample s;
      s.id = "n" + std::to_string(i);
      s.input = next_prompt(c, {random_image(40 + 9 * i, 25 + 7 * i, 20 + i)});
      s.input.ids.back() = 20 + i;  // the answer: token 20 + i, then end of sequence
      s.input.ids.push_back(2);
      s.input.targets.assign(s.input.ids.size(), -100);
      s.input.targets[s.input.ids.size() - 3] = 20 + i;
      s.input.targets[s.input.ids.size() - 2] = 2;
      s.target_tokens = 2;
      samples.push_back(s);
    }
    auto loss = [&] { return mean_loss(m, samples); };
    const float before = loss();
    TrainOptions o;
    o.parts = parse_parts("all");
    o.lr = 1e-2;
    o.batch_size = 3;
    o.max_steps = 120;
    o.progress = false;
    train_model(m, samples, o, "");
    const float after = loss();
    EXPECT_GT(before, 2.0f);
    EXPECT_LT(after, 0.1f) << "k=" << k;
    EXPECT_TRUE(m.weights().image_newline.defined());
  }
}

TEST(Next, EveryPresetBuildsAndTheAnyResTwinOfClipL1bKeepsItsLanguageModel) {
  for (const auto& name : preset_names()) {
    SCOPED_TRACE(name);
    ModelConfig c = preset_config(name);
    EXPECT_NO_THROW(c.validate());
    EXPECT_EQ(c.is_next(), name.find("next") != std::string::npos);
  }
  const ModelConfig twin = preset_config("clip-l-1b-next"), base = preset_config("clip-l-1b");
  const ModelConfig next7 = preset_config("llava-next-7b");
  EXPECT_EQ(twin.text.hidden_size, base.text.hidden_size);
  EXPECT_EQ(twin.text.num_hidden_layers, base.text.num_hidden_layers);
  EXPECT_EQ(twin.text.num_key_value_heads, base.text.num_key_value_heads);
  EXPECT_EQ(twin.image_grid_pinpoints, next7.image_grid_pinpoints);
  EXPECT_EQ(twin.vision.image_size, next7.vision.image_size);
  EXPECT_TRUE(preset_keeps_vocabulary("clip-l-1b-next"));
  EXPECT_FALSE(preset_keeps_vocabulary("llava-next-tiny"));
  // small-next: small's shapes, llava-v1.6's pinpoints scaled from 336 to 112 pixels.
  const ModelConfig small = preset_config("small"), small_next = preset_config("small-next");
  EXPECT_EQ(small_next.text.hidden_size, small.text.hidden_size);
  EXPECT_EQ(small_next.vision.hidden_size, small.vision.hidden_size);
  ASSERT_EQ(small_next.image_grid_pinpoints.size(), next7.image_grid_pinpoints.size());
  for (size_t i = 0; i < next7.image_grid_pinpoints.size(); ++i) {
    EXPECT_EQ(small_next.image_grid_pinpoints[i][0] * 3, next7.image_grid_pinpoints[i][0]);
    EXPECT_EQ(small_next.image_grid_pinpoints[i][1] * 3, next7.image_grid_pinpoints[i][1]);
  }
  try {
    preset_config("llava-9000");
    ADD_FAILURE() << "an unknown preset was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("clip-l-1b-next"), std::string::npos) << e.what();
  }
}
