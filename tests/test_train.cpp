// Training: overfitting, exact resume, labels, bad data.
#include <fstream>
#include <nlohmann/json.hpp>

#include <ATen/autocast_mode.h>

#include "helpers.h"
#include "victor/error.h"
#include "victor/files.h"
#include "victor/optim.h"
#include "victor/train.h"

using namespace victor;
using namespace victor::test;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {
std::vector<TrainSample> toy_samples(const ModelConfig& c) {
  std::vector<TrainSample> out;
  for (int i = 0; i < 3; ++i) {
    TrainSample s;
    s.id = "s" + std::to_string(i);
    s.input = prompt(c, {5, 6}, {7, int64_t(20 + i), int64_t(30 + i), 2}, random_pixels(1, 28, 40 + i));
    s.input.targets.assign(s.input.ids.size(), -100);
    size_t n = s.input.ids.size();
    s.input.targets[n - 4] = 20 + i;  // predict the answer after the prompt
    s.input.targets[n - 3] = 30 + i;
    s.input.targets[n - 2] = 2;
    s.input.ids[n - 3] = 20 + i;
    s.input.ids[n - 2] = 30 + i;
    s.target_tokens = 3;
    out.push_back(s);
  }
  return out;
}

// A small GridVQA folder (default 4x4 grids) in a fresh temporary directory.
std::string small_gridvqa(const std::string& name, int train_images, int test_images) {
  GridVqaOptions g;
  g.out_dir = temp_dir(name);
  g.train_images = train_images;
  g.test_images = test_images;
  build_gridvqa(g);
  return g.out_dir;
}

// The tiny preset sized for a tokenizer trained on GridVQA's sentences (vocabulary 400).
ModelConfig tiny_for(const Tokenizer& tok) {
  ModelConfig cfg = preset_config("tiny");
  cfg.text.vocab_size = 448;
  cfg.image_token_index = tok.token_id("<image>");
  cfg.pad_token_id = tok.token_id("<pad>");
  return cfg;
}

// The whole model, trained to overfit toy_samples (TinyModelOverfitsAFewSamples' settings).
TrainOptions overfit_options(int steps) {
  TrainOptions o;
  o.parts = parse_parts("all");
  o.lr = 1e-2;
  o.batch_size = 3;
  o.max_steps = steps;
  o.progress = false;
  return o;
}

}  // namespace

TEST(Train, TinyModelOverfitsAFewSamples) {
  for (int k : {-1, 2}) {  // plain and Victor
    auto cfg = tiny_config(k < 0 ? 0 : 4, k);
    Vlm m = Vlm::random(cfg, 50);
    auto samples = toy_samples(cfg);
    float before = mean_loss(m, samples);
    TrainOptions o = overfit_options(80);
    train_model(m, samples, o, "");
    float after = mean_loss(m, samples);
    EXPECT_GT(before, 3.0f);
    EXPECT_LT(after, 0.05f) << "k=" << k;
  }
}

TEST(Train, ResamplerLearnsAndItsLatentsGetGradients) {
  auto cfg = tiny_config();
  cfg.reducer = Reducer::parse("resampler:latents=4");
  Vlm m = Vlm::random(cfg, 51);
  // Its own parameters, counted with the reducer's part: latents 4x64, three norms, q/k/v/o 64x64,
  // a 4x MLP with biases.
  const int64_t d = 64;
  EXPECT_EQ(m.parameter_count(1 << int(Part::Registers)), 4 * d + 3 * 2 * d + 4 * d * d + 4 * d * d + 4 * d + 4 * d * d + d);
  auto samples = toy_samples(cfg);
  // The visual rows entering the LLM are the latents.
  m.set_trainable({Part::Registers});
  auto b = m.assemble({samples[0].input}, false);
  EXPECT_EQ(b.meta.kind.eq(int64_t(TokenKind::Visual)).sum().item<int64_t>(), 4);
  auto out = m.forward(b);
  auto sel = out.targets.ne(-100);
  torch::nn::functional::cross_entropy(m.logits(out.hidden.index({sel})), out.targets.index({sel})).backward();
  EXPECT_GT(m.weights().reducer.tensor("resampler.latents").grad().abs().sum().item<float>(), 0);
  EXPECT_GT(m.weights().reducer.matrix("resampler.attn.k_proj.weight").weight.grad().abs().sum().item<float>(), 0);
  // And the whole model with it overfits samples that differ only in their image.
  Vlm fresh = Vlm::random(cfg, 51);
  float before = mean_loss(fresh, samples);
  TrainOptions o = overfit_options(160);  // one more block between the image and the text: slower than the plain model's 80
  train_model(fresh, samples, o, "");
  EXPECT_GT(before, 3.0f);
  EXPECT_LT(mean_loss(fresh, samples), 0.05f);
  // Saved and loaded, it answers the same.
  auto dir = temp_dir("resampler");
  fresh.save(dir);
  Vlm back = Vlm::load(dir);
  EXPECT_EQ(back.config().reducer.spec(), "resampler:latents=4");
  EXPECT_FLOAT_EQ(mean_loss(back, samples), mean_loss(fresh, samples));
}

TEST(Train, Bf16AutocastOverfitsLikeFloat32AndKeepsFloat32MasterWeights) {
  // Victor (4 registers, k = 2), the whole model: with --autocast-bf16 the products run in bf16,
  // so the run differs from float32's, but it learns the same samples; the weights and the
  // optimizer stay float32, and autocast is off again afterwards.
  auto cfg = tiny_config(4, 2);
  auto samples = toy_samples(cfg);
  TrainOptions o = overfit_options(80);
  Vlm f32 = Vlm::random(cfg, 50), mixed = Vlm::random(cfg, 50);
  const float before = mean_loss(mixed, samples);
  train_model(f32, samples, o, "");
  o.autocast_bf16 = true;
  train_model(mixed, samples, o, "");
  EXPECT_FALSE(at::autocast::is_cpu_enabled());
  EXPECT_GT(before, 3.0f);
  EXPECT_LT(mean_loss(mixed, samples), 0.05f);
  EXPECT_LT(mean_loss(f32, samples), 0.05f);
  bool differs = false;
  for (size_t i = 0; i < mixed.params().size(); ++i) {
    EXPECT_EQ(mixed.params()[i].tensor->scalar_type(), torch::kFloat32) << mixed.params()[i].name;
    differs = differs || !torch::equal(*mixed.params()[i].tensor, *f32.params()[i].tensor);
  }
  EXPECT_TRUE(differs) << "autocast changed nothing: the products did not run in bf16";
}

TEST(Train, StopAndResumeEqualsUninterruptedRun) {
  auto cfg = tiny_config(2, 2);
  auto samples = toy_samples(cfg);
  TrainOptions o;
  o.parts = parse_parts("finetune");
  o.lr = 5e-3;
  o.batch_size = 2;  // crosses epochs: data order must be recomputed on resume
  o.max_steps = 6;
  o.progress = false;
  o.seed = 9;
  Vlm straight = Vlm::random(cfg, 51);
  o.out = temp_dir("straight");
  train_model(straight, samples, o, "");

  Vlm first = Vlm::random(cfg, 51);
  o.out = temp_dir("resume");
  o.stop_after = 3;
  train_model(first, samples, o, "");
  auto state = json::parse(read_file(o.out + "/trainer_state.json", FileKind::Dataset));
  EXPECT_EQ(state["step"], 3);
  Vlm second = Vlm::load(o.out);
  o.resume = true;
  o.stop_after = 0;
  train_model(second, samples, o, "");
  for (size_t i = 0; i < straight.params().size(); ++i)
    EXPECT_TRUE(torch::allclose(*straight.params()[i].tensor, *second.params()[i].tensor, 1e-6, 1e-7))
        << straight.params()[i].name;
  // The checkpoint is a loadable model folder.
  EXPECT_TRUE(torch::equal(*Vlm::load(o.out).params()[0].tensor, *second.params()[0].tensor));
}

TEST(Train, ShuffledVisualTokensArePermutedPerImageAndResumeExactly) {
  auto x = torch::arange(2 * 16 * 3, torch::kFloat).view({2, 16, 3});
  auto y = shuffle_tokens(x, 5);
  EXPECT_TRUE(torch::equal(y, shuffle_tokens(x, 5)));  // seeded
  EXPECT_FALSE(torch::equal(y, shuffle_tokens(x, 6)));
  EXPECT_FALSE(torch::equal(y, x));
  for (int i = 0; i < 2; ++i) {  // each token moves whole, within its own image, none lost
    auto rows = y[i];
    EXPECT_TRUE(torch::equal(std::get<0>(rows.select(1, 0).sort()), x[i].select(1, 0)));
    EXPECT_TRUE(torch::equal(rows.select(1, 1) - rows.select(1, 0), torch::ones({16})));
  }
  EXPECT_FALSE(torch::equal(y[0].select(1, 0) - 0, y[1].select(1, 0) - 48));  // a fresh order per image
  // A slice of the batch (a rank's share) gets the orders the whole batch gives those rows.
  auto x4 = torch::arange(4 * 16 * 3, torch::kFloat).view({4, 16, 3});
  auto whole = shuffle_tokens(x4, 9);
  EXPECT_TRUE(torch::equal(shuffle_tokens(x4.slice(0, 2, 4), 9, nullptr, 2), whole.slice(0, 2, 4)));
  EXPECT_FALSE(torch::equal(shuffle_tokens(x4.slice(0, 2, 4), 9), whole.slice(0, 2, 4)));

  auto cfg = tiny_config();
  auto samples = toy_samples(cfg);
  TrainOptions base;
  base.parts = parse_parts("finetune");
  base.lr = 5e-3;
  base.batch_size = 2;
  base.max_steps = 4;
  base.progress = false;
  TrainOptions o = base;
  o.shuffle_visual = true;
  Vlm straight = Vlm::random(cfg, 53), plain = Vlm::random(cfg, 53);
  train_model(straight, samples, o, "");
  o.out = temp_dir("shuffle-resume");
  o.stop_after = 2;
  Vlm first = Vlm::random(cfg, 53);
  train_model(first, samples, o, "");
  Vlm second = Vlm::load(o.out);
  o.resume = true;
  o.stop_after = 0;
  train_model(second, samples, o, "");
  // Up to float rounding (the resumed run recomputes features the straight run had cached); a
  // different token order would move parameters by about lr = 5e-3.
  for (size_t i = 0; i < straight.params().size(); ++i)
    EXPECT_TRUE(torch::allclose(*straight.params()[i].tensor, *second.params()[i].tensor, 1e-5, 1e-5))
        << straight.params()[i].name << " max diff " << (*straight.params()[i].tensor - *second.params()[i].tensor).abs().max().item<float>();
  train_model(plain, samples, base, "");  // the flag is not ignored: the order changes what is learned
  EXPECT_FALSE(torch::allclose(*plain.params().back().tensor, *straight.params().back().tensor, 1e-6, 1e-7));
}

TEST(Train, FrozenVisionFeatureCacheEqualsRecomputing) {
  auto cfg = tiny_config(2, 2);
  auto samples = toy_samples(cfg);
  TrainOptions o;
  o.parts = parse_parts("finetune");  // vision frozen: its features are cached
  o.lr = 5e-3;
  o.batch_size = 2;  // 6 steps over 3 samples: later epochs hit the cache
  o.max_steps = 6;
  o.progress = false;
  Vlm cached = Vlm::random(cfg, 52), fresh = Vlm::random(cfg, 52);
  auto hit = train_model(cached, samples, o, "");
  o.feature_cache_mb = 0;
  auto miss = train_model(fresh, samples, o, "");
  EXPECT_EQ(hit.feature_cache_hits, 12 - 3);  // every image after its first use
  EXPECT_EQ(miss.feature_cache_hits, 0);
  for (size_t i = 0; i < cached.params().size(); ++i)
    // Equal up to float rounding (features computed for 1 or 2 images at a time); a wrong image's
    // features would move parameters by about lr = 5e-3.
    EXPECT_TRUE(torch::allclose(*cached.params()[i].tensor, *fresh.params()[i].tensor, 1e-5, 1e-5))
        << cached.params()[i].name << " max diff "
        << (*cached.params()[i].tensor - *fresh.params()[i].tensor).abs().max().item<float>();
  // Samples of one image share its pixel tensor, and so its cached features.
  auto shared = samples;
  shared[1].input.pixels = shared[0].input.pixels;
  o.max_steps = 1;
  o.batch_size = 3;
  Vlm one = Vlm::random(cfg, 52);
  o.feature_cache_mb = 4096;
  EXPECT_EQ(train_model(one, shared, o, "").feature_cache_hits, 1);
  // Training the vision tower never uses the cache.
  o.parts = parse_parts("all");
  Vlm all = Vlm::random(cfg, 52);
  EXPECT_EQ(train_model(all, samples, o, "").feature_cache_hits, 0);
}

TEST(Train, LabelsCoverExactlyTheAssistantTokens) {
  auto dir = temp_dir("labels");
  train_tokenizer(gridvqa_corpus(), dir, 400);
  Tokenizer tok(dir);
  std::vector<Turn> turns{{"<image>\nHow many bags are there?", "2"}, {"Where is the dress?", "row 1, column 4"}};
  EncodedChat chat = encode_chat(tok, turns);
  std::vector<int64_t> targets;
  std::string prompt_text;
  for (size_t i = 0; i < chat.ids.size(); ++i)
    if (chat.is_target[i]) targets.push_back(chat.ids[i]);
  EXPECT_EQ(tok.decode(targets), "2 row 1, column 4");  // decode drops the two </s>
  EXPECT_EQ(std::count(targets.begin(), targets.end(), tok.eos_id()), 2);
  auto a1 = tok.encode("2"), a2 = tok.encode("row 1, column 4");
  EXPECT_EQ(targets.size(), a1.size() + a2.size() + 2);
  // Prepared samples shift targets by one: position j predicts token j+1.
  ModelConfig cfg = tiny_for(tok);
  Conversation c{"x", "", {{"How many bags are there?", "2"}}};
  auto samples = prepare_samples({c}, tok, cfg, dir, false, nullptr);
  const auto& in = samples[0].input;
  int n = 0;
  for (size_t j = 0; j + 1 < in.ids.size(); ++j)
    if (in.targets[j] != -100) {
      EXPECT_EQ(in.targets[j], in.ids[j + 1]);
      ++n;
    }
  EXPECT_EQ(n, int(a1.size()) + 1);
}

TEST(Train, BadDataIsNamedOrSkipped) {
  auto dir = temp_dir("baddata");
  train_tokenizer(gridvqa_corpus(), dir, 400);
  Tokenizer tok(dir);
  ModelConfig cfg = tiny_for(tok);
  cfg.text.max_position_embeddings = 60;
  auto write = [&](const std::string& text) { std::ofstream(dir + "/d.json") << text; };
  auto error_of = [&](const std::function<void()>& f) -> std::string {
    try {
      f();
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  write("[{\"id\": \"a\", \"conversations\": [");
  EXPECT_NE(error_of([&] { load_llava_json(dir + "/d.json"); }).find("malformed JSON"), std::string::npos);
  write(R"([{"id": "noimg", "image": "x.png", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])");
  EXPECT_NE(error_of([&] { load_llava_json(dir + "/d.json"); }).find("noimg"), std::string::npos);
  std::vector<std::string> bad;
  EXPECT_TRUE(load_llava_json(dir + "/d.json", &bad).empty());
  EXPECT_EQ(bad.size(), 1u);
  std::string long_q(400, 'x');
  write(R"([{"id": "missing", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "yo"}]},
            {"id": "long", "conversations": [{"from": "human", "value": ")" + long_q + R"("}, {"from": "gpt", "value": "yo"}]},
            {"id": "fine", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])");
  auto convs = load_llava_json(dir + "/d.json");
  auto e = error_of([&] { prepare_samples(convs, tok, cfg, dir, false, nullptr); });
  EXPECT_NE(e.find("missing"), std::string::npos);
  EXPECT_NE(e.find("image not found"), std::string::npos);
  std::vector<std::string> skipped;
  auto ok = prepare_samples(convs, tok, cfg, dir, true, &skipped);
  EXPECT_EQ(ok.size(), 1u);
  ASSERT_EQ(skipped.size(), 2u);
  EXPECT_NE(skipped[1].find("long"), std::string::npos);
  EXPECT_NE(skipped[1].find("exceed the context"), std::string::npos);
}

TEST(Train, WarmupThenCosineSchedule) {
  TrainOptions o;
  o.lr = 1.0;
  o.warmup_steps = 10;
  EXPECT_NEAR(lr_at(o, 0, 110), 0.1, 1e-12);
  EXPECT_NEAR(lr_at(o, 9, 110), 1.0, 1e-12);
  EXPECT_NEAR(lr_at(o, 60, 110), 0.5, 1e-12);  // half way through the cosine
  EXPECT_NEAR(lr_at(o, 110, 110), 0.0, 1e-12);
  EXPECT_THROW(parse_parts("vision,brain"), Error);
  EXPECT_EQ(parse_parts("pretrain").size(), 2u);
}

TEST(Train, AdamWEqualsLibTorchsAdamWWithClippingAndDecay) {
  // Both trainers' optimizer against torch::optim::AdamW (decay on every tensor there, so the
  // reference decays the matrix only by giving the vector its own group without decay).
  torch::manual_seed(5);
  auto w = torch::randn({4, 3}), b = torch::randn({4});
  auto rw = w.clone().requires_grad_(true), rb = b.clone().requires_grad_(true);
  AdamWOptions ao;
  ao.weight_decay = 0.1;
  AdamW ours({w, b}, ao);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<torch::Tensor>{rw}, std::make_unique<torch::optim::AdamWOptions>(
                                                          torch::optim::AdamWOptions(0.01).weight_decay(0.1)));
  groups.emplace_back(std::vector<torch::Tensor>{rb}, std::make_unique<torch::optim::AdamWOptions>(
                                                          torch::optim::AdamWOptions(0.01).weight_decay(0.0)));
  torch::optim::AdamW ref(groups);
  for (int step = 0; step < 6; ++step) {
    auto gw = torch::randn({4, 3}) * (step + 1), gb = torch::randn({4});
    std::vector<torch::Tensor> grads = {gw, gb};
    double norm = 0;
    const double scale = clip_scale(grads, 2.0, &norm, step);
    EXPECT_NEAR(norm, std::sqrt(gw.pow(2).sum().item<double>() + gb.pow(2).sum().item<double>()), 1e-4);
    ours.step(grads, 0.01, scale, step);
    rw.mutable_grad() = gw.clone();
    rb.mutable_grad() = gb.clone();
    torch::nn::utils::clip_grad_norm_(std::vector<torch::Tensor>{rw, rb}, 2.0);
    ref.step();
    EXPECT_TRUE(torch::allclose(w, rw.detach(), 1e-5, 1e-6)) << step << " " << (w - rw).abs().max().item<float>();
    EXPECT_TRUE(torch::allclose(b, rb.detach(), 1e-5, 1e-6)) << step;
  }
  EXPECT_NEAR(warmup_cosine_lr(2.0, 0, 4, 20, 0.1), 0.5, 1e-12);
  EXPECT_NEAR(warmup_cosine_lr(2.0, 20, 4, 20, 0.1), 0.2, 1e-12) << "the floor";
}

TEST(Train, VisionPretrainingLearnsCellClasses) {
  auto dir = small_gridvqa("vpre", 16, 4);
  auto cfg = tiny_config();
  Vlm m = Vlm::random(cfg, 70);
  auto train = load_grid_images(dir, "train", cfg);
  auto test = load_grid_images(dir, "t10k", cfg);
  ASSERT_EQ(train.size(), 16u);
  ASSERT_EQ(test.size(), 4u);
  auto before = m.weights().vision.layers[0].fc1.weight.clone();
  auto proj_before = m.weights().proj1.weight.clone();
  VisionPretrainOptions o;
  o.steps = 1;
  o.batch_size = 16;
  o.progress = false;
  auto first = pretrain_vision(m, train, test, o);
  o.steps = 150;
  o.lr = 3e-3;
  auto r = pretrain_vision(m, train, test, o);
  EXPECT_LT(r.final_loss, 0.5 * first.final_loss);
  EXPECT_LT(r.final_class_loss, 0.5 * first.final_class_loss);  // both heads learn
  EXPECT_LT(r.final_place_loss, 0.6 * first.final_place_loss);
  EXPECT_FALSE(torch::equal(before, m.weights().vision.layers[0].fc1.weight));
  EXPECT_TRUE(torch::equal(proj_before, m.weights().proj1.weight));  // only the vision tower changes
  EXPECT_GE(r.test_cell_accuracy, 0.0);
  EXPECT_LE(r.test_cell_accuracy, 1.0);
}

TEST(Train, PatchCellsMapEveryPatchToItsGridCell) {
  auto idx = patch_cells(4, 16);
  ASSERT_EQ(idx.numel(), 256);
  EXPECT_EQ(idx[0].item<int64_t>(), 0);
  EXPECT_EQ(idx[3].item<int64_t>(), 0);
  EXPECT_EQ(idx[4].item<int64_t>(), 1);
  EXPECT_EQ(idx[5 * 16 + 13].item<int64_t>(), 1 * 4 + 3);  // patch row 5 is cell row 1, column 13 is cell column 3
  EXPECT_EQ(idx[255].item<int64_t>(), 15);
  EXPECT_EQ(torch::bincount(idx).min().item<int64_t>(), 16);  // 16 patches per cell, none left out
  EXPECT_THROW(patch_cells(3, 16), Error);
}

TEST(Train, PerPatchVisionTargetsTeachEverySingleToken) {
  // Per-patch targets: each single visual token must name its cell's class; the training grids
  // double as the test set so the measure is of what was taught, not of generalisation.
  auto dir = small_gridvqa("vpatch", 8, 1);
  auto cfg = tiny_config();
  cfg.vision.image_size = 56;  // 8x8 patches: 2x2 per cell (tiny's 28 px has one patch per cell)
  cfg.preprocess.crop_size = cfg.preprocess.shortest_edge = 56;
  auto train = load_grid_images(dir, "train", cfg);
  VisionPretrainOptions o;
  o.batch_size = 8;
  o.progress = false;
  o.lr = 3e-3;
  o.steps = 100;
  o.per_patch = true;
  Vlm patch_model = Vlm::random(cfg, 71);
  auto r = pretrain_vision(patch_model, train, train, o);
  o.per_patch = false;
  Vlm cell_model = Vlm::random(cfg, 71);
  auto c = pretrain_vision(cell_model, train, train, o);
  EXPECT_GT(r.test_patch_accuracy, 0.5);  // 11 classes: chance is far lower
  EXPECT_GT(r.test_patch_accuracy, c.test_patch_accuracy + 0.02);  // cell targets teach single patches less

  // With one patch per cell (tiny's own 28 px) the two targets are the same computation.
  auto cfg1 = tiny_config();
  auto train1 = load_grid_images(dir, "train", cfg1);
  o.steps = 5;
  Vlm a = Vlm::random(cfg1, 72), b = Vlm::random(cfg1, 72);
  o.per_patch = true;
  auto ra = pretrain_vision(a, train1, train1, o);
  o.per_patch = false;
  auto rb = pretrain_vision(b, train1, train1, o);
  EXPECT_NEAR(ra.final_loss, rb.final_loss, 1e-5);
  EXPECT_TRUE(torch::allclose(a.weights().vision.layers[0].fc1.weight, b.weights().vision.layers[0].fc1.weight,
                              1e-5, 1e-6));
}

TEST(Train, VisionCountTargetsTeachWhatTheImageHolds) {
  // class_counts against a hand count: image 0 holds one 0 and two 3s, image 1 one 3 and one 9.
  auto counts = class_counts(torch::tensor({-1, 3, 3, 0, 9, -1, 3, -1}).view({2, 4}));
  ASSERT_EQ(counts.sizes(), (std::vector<int64_t>{2, 10}));
  EXPECT_TRUE(torch::equal(counts[0], torch::tensor({1, 0, 0, 2, 0, 0, 0, 0, 0, 0}, torch::kInt64)));
  EXPECT_TRUE(torch::equal(counts[1], torch::tensor({0, 0, 0, 1, 0, 0, 0, 0, 0, 1}, torch::kInt64)));

  // The count head learns the training grids' counts (measured on those grids: what was taught)
  // far better than always answering each class's most common count.
  auto dir = small_gridvqa("vcount", 16, 1);
  auto cfg = tiny_config();
  auto train = load_grid_images(dir, "train", cfg);
  std::vector<torch::Tensor> labs;
  for (auto& g : train) labs.push_back(torch::tensor(std::vector<int64_t>(g.labels.begin(), g.labels.end())));
  auto truth = class_counts(torch::stack(labs));  // [16,10]
  int64_t majority = 0;
  for (int c = 0; c < 10; ++c) majority += torch::bincount(truth.select(1, c)).max().item<int64_t>();
  const double baseline = double(majority) / double(truth.numel());

  VisionPretrainOptions o;
  o.batch_size = 16;
  o.progress = false;
  o.lr = 3e-3;
  o.counts = true;
  o.steps = 1;
  Vlm m = Vlm::random(cfg, 73);
  auto first = pretrain_vision(m, train, train, o);
  EXPECT_GT(first.final_count_loss, 1.0);  // about ln(17) at the start
  o.steps = 200;
  auto r = pretrain_vision(m, train, train, o);
  EXPECT_LT(r.final_count_loss, 0.5 * first.final_count_loss);
  EXPECT_GT(r.test_count_mean_accuracy, baseline + 0.1) << "majority baseline " << baseline;

  o.counts = false;  // off: no count loss, no count accuracy
  Vlm off = Vlm::random(cfg, 73);
  o.steps = 2;
  auto r0 = pretrain_vision(off, train, train, o);
  EXPECT_EQ(r0.final_count_loss, 0.0);
  EXPECT_EQ(r0.test_count_mean_accuracy, 0.0);
  EXPECT_NEAR(r0.final_loss, r0.final_class_loss + r0.final_place_loss, 1e-9);
}

// Visual token centres and box weights, on the small preset's 16 x 16 patches, pooled and not.
TEST(Train, BoxesSelectTheVisualTokensTheyCover) {
  ModelConfig cfg = preset_config("small");
  auto full = visual_token_centres(cfg);
  ASSERT_EQ(full.size(0), 256);
  EXPECT_FLOAT_EQ(full[17][0].item<float>(), 1.5f / 16);  // patch row 1, column 1
  EXPECT_FLOAT_EQ(full[17][1].item<float>(), 1.5f / 16);
  Box cell{0.5f, 0.25f, 0.75f, 0.5f};  // row 2, column 3 of a 4 x 4 grid
  auto w = box_token_weights({cell}, full);
  EXPECT_FLOAT_EQ(w.sum().item<float>(), 1.0f);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      EXPECT_FLOAT_EQ(w[r * 16 + c].item<float>(), (r / 4 == 1 && c / 4 == 2) ? 1.0f / 16 : 0.0f) << r << "," << c;
  cfg.reducer = Reducer::pool({4});
  auto pooled = visual_token_centres(cfg);
  ASSERT_EQ(pooled.size(0), 16);
  auto wp = box_token_weights({cell, {0, 0, 0.25f, 0.25f}}, pooled);
  EXPECT_FLOAT_EQ(wp[6].item<float>(), 1.0f);
  EXPECT_FLOAT_EQ(wp[0].item<float>(), 1.0f);
  EXPECT_FLOAT_EQ(wp.sum().item<float>(), 2.0f);
  EXPECT_FLOAT_EQ(box_token_weights({{0.01f, 0.01f, 0.02f, 0.02f}}, pooled).sum().item<float>(), 0.0f);  // holds no centre
  // Boxes through the preprocessing: a square image is unchanged; a 200 x 100 one is padded to
  // 200 x 200 (the image's rows land in 0.25..0.75).
  Box out;
  ASSERT_TRUE(box_in_input(cell, 112, 112, cfg.preprocess, &out));
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(out[i], cell[i], 1e-6);
  ASSERT_TRUE(box_in_input({0, 0, 1, 1}, 200, 100, cfg.preprocess, &out));
  EXPECT_NEAR(out[0], 0.0, 1e-6);
  EXPECT_NEAR(out[1], 0.25, 1e-6);
  EXPECT_NEAR(out[2], 1.0, 1e-6);
  EXPECT_NEAR(out[3], 0.75, 1e-6);
  cfg.preprocess.pad_to_square = false;  // center crop of the middle 100 x 100: the box's right end is cut
  ASSERT_TRUE(box_in_input({0.5f, 0, 1, 1}, 200, 100, cfg.preprocess, &out));
  EXPECT_NEAR(out[0], 0.5, 1e-6);
  EXPECT_NEAR(out[2], 1.0, 1e-6);
  EXPECT_FALSE(box_in_input({0, 0, 0.2f, 1}, 200, 100, cfg.preprocess, &out));  // cropped away
}

// The grounding loss teaches the supervised head to look where the answers rest: on GridVQA's
// boxes, the head's attention on the answers' regions (and the sink) rises far above what the
// same training without it leaves there, and a layer after Victor's drop is refused.
TEST(Train, GroundedAttentionLooksAtTheAnswersBoxes) {
  auto data = small_gridvqa("ground", 48, 0);
  auto dir = temp_dir("ground_model");
  train_tokenizer(gridvqa_corpus(), dir, 400);
  Tokenizer tok(dir);
  ModelConfig cfg = tiny_for(tok);
  auto samples = prepare_samples(split_turns(load_llava_json(data + "/train.json")), tok, cfg, data, false, nullptr);
  ASSERT_EQ(samples[0].grounding.size(), 1u);
  auto run = [&](double weight, bool shuffle) {
    Vlm m = Vlm::random(cfg, 3);
    TrainOptions o;
    o.parts = parse_parts("finetune");
    o.lr = 3e-3;
    o.batch_size = 16;
    o.max_steps = 60;
    o.progress = false;
    o.shuffle_visual = shuffle;
    o.ground_weight = weight;
    train_model(m, samples, o, "");
    // Measure the mass with the loss's own code path: weight > 0, lr 0, one step, shuffle off.
    TrainOptions probe = o;
    probe.ground_weight = 1;
    probe.lr = 0;
    probe.max_steps = 1;
    probe.batch_size = int(samples.size());
    probe.shuffle_visual = false;
    return train_model(m, samples, probe, "").final_ground_mass;
  };
  const double off = run(0, false), on = run(1, false), shuffled = run(1, true);
  std::cout << "attention on the answers' regions: " << off << " untaught, " << on << " taught, " << shuffled
            << " taught on shuffled tokens\n";
  EXPECT_LT(off, 0.2);  // measured 0.07 untaught, 0.57 taught
  EXPECT_GT(on, 0.45);
  EXPECT_GT(shuffled, 0.45);  // the targets follow each token to its shuffled place
  // Refused by name: a layer after Victor's drop, and data without boxes.
  auto error_of = [&](const ModelConfig& c, const std::vector<TrainSample>& data) -> std::string {
    Vlm v = Vlm::random(c, 3);
    TrainOptions o;
    o.parts = parse_parts("finetune");
    o.max_steps = 1;
    o.progress = false;
    o.ground_weight = 1;
    o.ground_layer = 1;
    try {
      train_model(v, data, o, "");
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(error_of(tiny_config(), toy_samples(tiny_config())).find("\"boxes\""), std::string::npos);
  cfg.reducer = Reducer::victor({0, 1, RegisterMask::Causal});  // the visual tokens leave after layer 1
  EXPECT_NE(error_of(cfg, samples).find("--ground-layer 1"), std::string::npos);
}
