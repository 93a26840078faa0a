// Checkpoint I/O, config, images, tokenizer, npy.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>

#include "helpers.h"
#include "victor/gridvqa.h"
#include "victor/error.h"
#include "victor/files.h"
#include "victor/image.h"
#include "victor/model.h"
#include "victor/npy.h"
#include "victor/safetensors.h"
#include "victor/tokenizer.h"

#include <stb/stb_image_write.h>

using namespace victor;
using namespace victor::test;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {
void write_bytes(const std::string& p, const std::string& b) {
  std::ofstream(p, std::ios::binary) << b;
}
}  // namespace

TEST(Safetensors, RoundTripAndDtypeConversion) {
  auto dir = temp_dir("st");
  torch::manual_seed(0);
  auto a = torch::randn({3, 4}), b = torch::arange(6, torch::kFloat32).view({2, 3});
  for (auto dt : {SaveDtype::F32, SaveDtype::F16, SaveDtype::BF16}) {
    std::string p = dir + "/t.safetensors";
    save_safetensors(p, {{"a", a}, {"b", b}}, dt);
    SafetensorsFile f(p);
    EXPECT_EQ(f.tensors().at("a").dtype, dt == SaveDtype::F32 ? "F32" : dt == SaveDtype::F16 ? "F16" : "BF16");
    auto la = f.load("a");
    EXPECT_EQ(la.scalar_type(), torch::kFloat32);
    double tol = dt == SaveDtype::F32 ? 0 : dt == SaveDtype::F16 ? 2e-3 : 2e-2;
    EXPECT_TRUE(torch::allclose(la, a, tol, tol)) << int(dt);
    EXPECT_TRUE(torch::equal(f.load("b"), b));  // small integers are exact in every dtype
  }
  // Reference bytes: the header is JSON, 8-byte aligned, little-endian length first.
  std::string raw = read_file(dir + "/t.safetensors", FileKind::Dataset);
  uint64_t hl = 0;
  for (int i = 7; i >= 0; --i) hl = (hl << 8) | uint8_t(raw[i]);
  EXPECT_EQ((8 + hl) % 8, 0u);
  EXPECT_TRUE(json::parse(raw.substr(8, hl)).contains("a"));
}

namespace {
// This process's resident memory in bytes (/proc/self/statm, second field, in pages).
int64_t resident_bytes() {
  std::ifstream f("/proc/self/statm");
  int64_t size = 0, resident = 0;
  f >> size >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}
}  // namespace

TEST(Safetensors, ReleasedPagesLeaveResidentMemoryAndReadBackIntact) {
  // A loaded model copies each weight into its own memory; the file's pages it read must not
  // stay resident beside the copy (peak memory was twice the weights), yet stay readable.
  auto dir = temp_dir("st_release");
  const std::string p = dir + "/big.safetensors";
  auto big = torch::arange(16 * 1024 * 1024, torch::kFloat32).view({4096, 4096});  // 64 MiB
  auto small = torch::randn({3, 5});
  save_safetensors(p, {{"big", big}, {"small", small}});
  SafetensorsFile f(p);
  const int64_t before = resident_bytes();
  EXPECT_TRUE(torch::equal(f.load_raw("big"), big));  // faults the whole tensor in
  const int64_t touched = resident_bytes();
  EXPECT_GT(touched - before, int64_t(60) << 20);
  f.release_pages("big");
  EXPECT_LT(resident_bytes() - before, int64_t(4) << 20) << "the tensor's pages are still resident";
  EXPECT_TRUE(torch::equal(f.load_raw("big"), big));  // read again from the file
  EXPECT_TRUE(torch::equal(f.load_raw("small"), small));  // its neighbour untouched
  f.release_pages("no such tensor");                    // ignored
}

TEST(Safetensors, ShardedCheckpointLoads) {
  auto dir = temp_dir("shard");
  std::vector<std::pair<std::string, torch::Tensor>> ts;
  for (int i = 0; i < 5; ++i) ts.emplace_back("w" + std::to_string(i), torch::full({100}, float(i)));
  save_checkpoint_tensors(dir, ts, 800);  // 400 bytes each -> several shards
  EXPECT_TRUE(fs::exists(dir + "/model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors"));
  auto idx = json::parse(read_file(dir + "/model.safetensors.index.json", FileKind::Dataset));
  std::set<std::string> shards;
  for (auto& [k, v] : idx["weight_map"].items()) shards.insert(v.get<std::string>());
  EXPECT_GE(shards.size(), 2u);
  TensorStore store(dir);
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(torch::equal(store.load("w" + std::to_string(i)), ts[i].second));
  // A shard listed in the index but missing is named.
  fs::remove(fs::path(dir) / *shards.begin());
  EXPECT_NE(error_of([&] { TensorStore s(dir); }).find(*shards.begin()), std::string::npos);
}

TEST(Safetensors, CorruptAndTruncatedFilesAreNamed) {
  auto dir = temp_dir("corrupt");
  std::string p = dir + "/m.safetensors";
  save_safetensors(p, {{"weight_x", torch::ones({64})}});
  std::string good = read_file(p, FileKind::Dataset);
  write_bytes(p, good.substr(0, good.size() - 10));  // truncated data
  auto e = error_of([&] { SafetensorsFile f(p); });
  EXPECT_NE(e.find(p), std::string::npos);
  EXPECT_NE(e.find("weight_x"), std::string::npos);
  write_bytes(p, good.substr(0, 5));  // no header
  EXPECT_NE(error_of([&] { SafetensorsFile f(p); }).find("truncated"), std::string::npos);
  std::string bad = good;
  bad[8] = '#';  // header no longer JSON
  write_bytes(p, bad);
  EXPECT_NE(error_of([&] { SafetensorsFile f(p); }).find("not JSON"), std::string::npos);
  std::string huge = good;
  huge[6] = 1;  // header length beyond the file
  write_bytes(p, huge);
  EXPECT_NE(error_of([&] { SafetensorsFile f(p); }).find("exceeds file size"), std::string::npos);
}

TEST(Checkpoint, MissingTensorAndShapeMismatchAreNamed) {
  auto dir = temp_dir("ckpt");
  Vlm m = Vlm::random(tiny_config(), 1);
  m.save(dir);
  {  // drop one tensor
    SafetensorsFile f(dir + "/model.safetensors");
    std::vector<std::pair<std::string, torch::Tensor>> ts;
    for (auto& [n, i] : f.tensors())
      if (n != "language_model.model.layers.1.mlp.up_proj.weight") ts.emplace_back(n, f.load(n).clone());
    save_safetensors(dir + "/model.safetensors", ts);
  }
  auto e = error_of([&] { Vlm::load(dir); });
  EXPECT_NE(e.find("language_model.model.layers.1.mlp.up_proj.weight"), std::string::npos) << e;
  EXPECT_NE(e.find(dir), std::string::npos);

  m.save(dir);
  auto cfg = json::parse(read_file(dir + "/config.json", FileKind::Dataset));
  cfg["text_config"]["intermediate_size"] = 96;
  write_bytes(dir + "/config.json", cfg.dump());
  e = error_of([&] { Vlm::load(dir); });
  EXPECT_NE(e.find("model.safetensors"), std::string::npos) << e;
  EXPECT_NE(e.find("gate_proj"), std::string::npos) << e;
  EXPECT_NE(e.find("config.json"), std::string::npos) << e;
}

TEST(Checkpoint, SaveLoadRoundTripAndNewerNamingScheme) {
  auto dir = temp_dir("rt");
  auto cfg = tiny_config(3, 2);
  Vlm m = Vlm::random(cfg, 7);
  m.save(dir);
  Vlm l = Vlm::load(dir);
  auto px = random_pixels(1, cfg.vision.image_size, 1);
  std::vector<PromptInput> rows{prompt(cfg, {5, 6}, {7, 8, 9}, px)};
  EXPECT_TRUE(torch::equal(last_logits(m, rows), last_logits(l, rows)));
  // Newer transformers: model.language_model.*, model.vision_tower.*, lm_head.weight.
  const auto ts = tensors_in_2025_layout(dir);
  auto dir2 = temp_dir("rt2");
  save_checkpoint_tensors(dir2, ts, 200000);  // sharded too
  fs::copy(dir + "/config.json", dir2 + "/config.json");
  Vlm l2 = Vlm::load(dir2);
  EXPECT_TRUE(torch::equal(last_logits(m, rows), last_logits(l2, rows)));
}

TEST(Config, DefaultsValidationAndErrors) {
  // A llava-1.5-7b-hf style config leaves most keys to the Hugging Face class defaults.
  json j = {{"image_token_index", 32000},
            {"vision_config", {{"hidden_size", 1024}, {"image_size", 336}, {"intermediate_size", 4096},
                               {"num_attention_heads", 16}, {"num_hidden_layers", 24}, {"patch_size", 14}}},
            {"text_config", {{"model_type", "llama"}, {"vocab_size", 32064}}}};
  ModelConfig c = config_from_json(j, "config.json");
  c.validate();
  EXPECT_EQ(c.text.hidden_size, 4096);
  EXPECT_EQ(c.text.num_key_value_heads, 32);
  EXPECT_DOUBLE_EQ(c.text.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.visual_tokens_per_image(), 576);
  EXPECT_EQ(c.vision_layers_needed(), 23);
  EXPECT_EQ(c.vision.hidden_act, "quick_gelu");
  EXPECT_TRUE(c.reducer.is_none());
  j["text_config"]["num_key_value_heads"] = 5;
  auto e = error_of([&] { config_from_json(j, "config.json").validate(); });
  EXPECT_NE(e.find("num_key_value_heads"), std::string::npos);
  j["text_config"]["num_key_value_heads"] = 8;
  j["text_config"]["rms_norm_eps"] = -1e-6;  // accepted before: NaN or wrong norms, never an error
  EXPECT_NE(error_of([&] { config_from_json(j, "config.json").validate(); }).find("text_config.rms_norm_eps"),
            std::string::npos);
  j["text_config"]["rms_norm_eps"] = 1e-6;
  j["summary_layers"] = 40;
  EXPECT_NE(error_of([&] { config_from_json(j, "config.json").validate(); }).find("summary_layers"),
            std::string::npos);
  j["summary_layers"] = 3;
  j["register_mask"] = "sideways";
  EXPECT_NE(error_of([&] { config_from_json(j, "config.json"); }).find("register_mask"), std::string::npos);
  j["register_mask"] = "causal";
  // Found by fuzzing: a number where a string belongs escaped as a raw JSON-library exception.
  j["image_aspect_ratio"] = 512;
  e = error_of([&] { config_from_json(j, "config.json"); });
  EXPECT_NE(e.find("config.json: key 'image_aspect_ratio' has the wrong type"), std::string::npos) << e;
  j["image_aspect_ratio"] = "pad";
  j["text_config"]["head_dim"] = "wide";
  e = error_of([&] { config_from_json(j, "config.json"); });
  EXPECT_NE(e.find("'head_dim' has the wrong type"), std::string::npos) << e;
  j["text_config"].erase("head_dim");
  auto dir = temp_dir("cfg");
  write_bytes(dir + "/config.json", "{ not json");
  EXPECT_NE(error_of([&] { load_config(dir); }).find("malformed JSON"), std::string::npos);
  EXPECT_NE(error_of([&] { load_config(dir + "/nope"); }).find("not found"), std::string::npos);
}

TEST(Image, PreprocessSolidColourIsExactlyNormalized) {
  Image img;
  img.width = img.height = 16;
  img.rgb.assign(16 * 16 * 3, 0);
  for (size_t i = 0; i < img.rgb.size(); i += 3) img.rgb[i] = 200, img.rgb[i + 1] = 100, img.rgb[i + 2] = 50;
  PreprocessConfig p;
  p.shortest_edge = p.crop_size = 8;
  auto x = preprocess_image(img, p);
  ASSERT_EQ(x.sizes(), (std::vector<int64_t>{3, 8, 8}));
  const double v[3] = {200, 100, 50};
  for (int c = 0; c < 3; ++c)
    EXPECT_TRUE(torch::allclose(x[c], torch::full({8, 8}, float((v[c] / 255 - p.image_mean[c]) / p.image_std[c])), 1e-5, 1e-5));
}

TEST(Image, PadToSquareUsesMeanColourCentred) {
  Image img;  // 4 wide, 2 high, white
  img.width = 4;
  img.height = 2;
  img.rgb.assign(4 * 2 * 3, 255);
  PreprocessConfig p;
  p.shortest_edge = p.crop_size = 4;  // no resize needed
  auto x = preprocess_image(img, p);
  const int fill[3] = {122, 116, 104};  // int(CLIP mean * 255)
  for (int c = 0; c < 3; ++c) {
    float f = float((fill[c] / 255.0 - p.image_mean[c]) / p.image_std[c]);
    float w = float((1.0 - p.image_mean[c]) / p.image_std[c]);
    for (int xcol = 0; xcol < 4; ++xcol) {
      EXPECT_NEAR(x[c][0][xcol].item<float>(), f, 1e-5);
      EXPECT_NEAR(x[c][1][xcol].item<float>(), w, 1e-5);
      EXPECT_NEAR(x[c][2][xcol].item<float>(), w, 1e-5);
      EXPECT_NEAR(x[c][3][xcol].item<float>(), f, 1e-5);
    }
  }
}

TEST(Image, BicubicDownscaleMatchesPilFormula) {
  // Row [0,0,255,255] to 2 pixels: antialiased Keys cubic (a=-0.5) worked by hand gives
  // 255*0.15625/1.890625 = 21.07 -> 21, and 255 - 21.07 -> 234.
  Image img;
  img.width = 4;
  img.height = 1;
  img.rgb = {0, 0, 0, 0, 0, 0, 255, 255, 255, 255, 255, 255};
  auto r = resize_bicubic(img, 2, 1);
  EXPECT_EQ(r[0][0][0].item<float>(), 21.0f);
  EXPECT_EQ(r[0][1][0].item<float>(), 234.0f);
}

TEST(Image, NotAnImageIsAClearError) {
  auto e = error_of([] { decode_image("this is text, not pixels", "notes.txt"); });
  EXPECT_NE(e.find("notes.txt"), std::string::npos);
  EXPECT_NE(e.find("not a readable image"), std::string::npos);
  Image img;
  img.width = 3;
  img.height = 2;
  img.rgb = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18};
  Image back = decode_image(encode_png(img), "mem");
  EXPECT_EQ(back.rgb, img.rgb);
}

namespace {
std::vector<int64_t> spm_encode(const std::string& model, const std::string& text) {
  auto dir = temp_dir("spm");
  write_bytes(dir + "/in.txt", text + "\n");
  std::string cmd = "spm_encode --model=" + model + " --output_format=id < " + dir + "/in.txt > " + dir + "/out.txt";
  EXPECT_EQ(std::system(cmd.c_str()), 0);
  std::istringstream in(read_file(dir + "/out.txt", FileKind::Dataset));
  std::vector<int64_t> ids;
  int64_t v;
  while (in >> v) ids.push_back(v);
  return ids;
}
}  // namespace

TEST(Tokenizer, MatchesSentencePieceReferenceForUnigramAndBpe) {
  const std::vector<std::string> texts = {"What is in row 2, column 3?", "How many ankle boots are there?",
                                          "Is there a dress? yes", "zebra quokka 42 ünïcode"};
  auto dir = temp_dir("tok");
  int n = train_tokenizer(gridvqa_corpus(), dir, 400, "unigram");
  Tokenizer tok(dir);
  EXPECT_EQ(tok.sp_size(), n);
  EXPECT_EQ(tok.token_id("<image>"), n);
  for (auto& t : texts) {
    EXPECT_EQ(tok.encode(t), spm_encode(dir + "/tokenizer.model", t)) << t;
    EXPECT_EQ(tok.decode(tok.encode(t)), t);
  }
  // A llama-style BPE model trained by spm_train directly.
  auto bdir = temp_dir("tokbpe");
  std::string corpus;
  for (auto& l : gridvqa_corpus()) corpus += l + "\n";
  write_bytes(bdir + "/c.txt", corpus);
  std::string cmd = "spm_train --input=" + bdir + "/c.txt --model_prefix=" + bdir +
                    "/tokenizer --vocab_size=400 --model_type=bpe --byte_fallback=true "
                    "--normalization_rule_name=identity --remove_extra_whitespaces=false "
                    "--minloglevel=2 > " + bdir + "/log.txt 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  Tokenizer bpe(bdir);
  for (auto& t : texts) EXPECT_EQ(bpe.encode(t), spm_encode(bdir + "/tokenizer.model", t)) << t;
  // The default (BPE) tokenizer victor trains keeps the vocabulary's words whole.
  auto ddir = temp_dir("tokdefault");
  train_tokenizer(gridvqa_corpus(), ddir, 512);
  Tokenizer def(ddir);
  for (auto& t : texts) EXPECT_EQ(def.encode(t), spm_encode(ddir + "/tokenizer.model", t)) << t;
  EXPECT_EQ(def.encode("What is in row 2, column 3?").size(), 11u);  // What is in row _ 2 , column _ 3 ?
  // Added tokens split the text.
  auto ids = tok.encode("<image>\nWhat");
  EXPECT_EQ(ids[0], n);
}

TEST(Tokenizer, WordByWordEncodingEqualsSentencePieceOnLongAndOddTexts) {
  // victor encodes word by word when no piece spans a word boundary (memory follows the longest
  // word). Against spm_encode: a long paragraph, runs of unknown characters across words (merged
  // into one unknown without byte fallback), and models whose pieces DO span words
  // (--split_by_whitespace=false: the whole-text path).
  std::string para;
  const std::vector<std::string> corpus = gridvqa_corpus();
  for (size_t i = 0; i < 400; ++i) para += corpus[(i * 7) % corpus.size()] + (i % 5 ? " " : "  ");
  const std::vector<std::string> texts = {para, "\xea\x99\xae\xea\x99\xae \xea\x99\xae  \xea\x99\xae x",
                                          " leading and trailing  ", "row2column3?? bag,bag;bag"};
  auto bdir = temp_dir("tokwords");
  std::string c;
  for (auto& l : corpus) c += l + "\n";
  write_bytes(bdir + "/c.txt", c);
  struct Variant {
    std::string name, flags;
  };
  for (const Variant& v : {Variant{"unigram_unk", "--model_type=unigram --byte_fallback=false"},
                           Variant{"bpe_unk", "--model_type=bpe --byte_fallback=false"},
                           Variant{"bpe_across", "--model_type=bpe --byte_fallback=true --split_by_whitespace=false"},
                           Variant{"unigram_across", "--model_type=unigram --byte_fallback=true --split_by_whitespace=false"}}) {
    const std::string dir = bdir + "/" + v.name;
    std::filesystem::create_directories(dir);
    const std::string cmd = "spm_train --input=" + bdir + "/c.txt --model_prefix=" + dir + "/tokenizer --vocab_size=600 --hard_vocab_limit=false " +
                            v.flags + " --normalization_rule_name=identity --minloglevel=2 > " + dir + "/log.txt 2>&1";
    ASSERT_EQ(std::system(cmd.c_str()), 0) << v.name;
    Tokenizer tok(dir);
    for (auto& t : texts) EXPECT_EQ(tok.encode(t), spm_encode(dir + "/tokenizer.model", t)) << v.name << ": " << t.substr(0, 60);
  }
}

TEST(Tokenizer, CorruptModelIsAClearError) {
  auto dir = temp_dir("badtok");
  write_bytes(dir + "/tokenizer.model", "\x0a\xff\xff\xff");
  auto e = error_of([&] { Tokenizer t(dir); });
  EXPECT_NE(e.find("tokenizer.model"), std::string::npos) << e;
}

TEST(Config, EveryFieldRoundTripsThroughConfigJson) {
  // Each preset, and one with every field moved off its default, write and read back equal: the
  // field tables drive both directions, so a field added to one and not the other fails here.
  for (const char* name : {"tiny", "small", "clip-l-1b", "llava-7b"}) {
    ModelConfig c = preset_config(name);
    const json j = config_to_json(c);
    EXPECT_EQ(config_to_json(config_from_json(j, "x")), j) << name;
  }
  ModelConfig c = preset_config("tiny");
  c.vision.num_channels = 1;
  c.vision.layer_norm_eps = 3e-6;
  c.vision.hidden_act = "gelu";
  c.text.num_key_value_heads = 1;
  c.text.rms_norm_eps = 2e-6;
  c.text.rope_theta = 5e5;
  c.text.tie_word_embeddings = true;
  c.text.bos_token_id = 7;
  c.text.eos_token_id = 9;
  c.image_token_index = 33;
  c.pad_token_id = 34;
  c.projector_hidden_act = "relu";
  c.vision_feature_layer = -1;
  c.vision_feature_select_strategy = "full";
  const json j = config_to_json(c);
  const ModelConfig back = config_from_json(j, "x");
  EXPECT_EQ(back.vision.num_channels, 1);
  EXPECT_DOUBLE_EQ(back.vision.layer_norm_eps, 3e-6);
  EXPECT_EQ(back.text.num_key_value_heads, 1);
  EXPECT_DOUBLE_EQ(back.text.rope_theta, 5e5);
  EXPECT_TRUE(back.text.tie_word_embeddings);
  EXPECT_EQ(back.text.eos_token_id, 9);
  EXPECT_EQ(back.pad_token_id, 34);
  EXPECT_EQ(back.vision_feature_select_strategy, "full");
  EXPECT_EQ(config_to_json(back), j);
  // Keys left out take Hugging Face's class defaults; a missing num_key_value_heads means one per head.
  json sparse = {{"text_config", {{"num_attention_heads", 8}, {"hidden_size", 64}}}, {"vision_config", json::object()}};
  const ModelConfig d = config_from_json(sparse, "x");
  EXPECT_EQ(d.text.num_key_value_heads, 8);
  EXPECT_EQ(d.vision.hidden_size, 768);
  EXPECT_EQ(d.vision.patch_size, 32);
  EXPECT_EQ(d.text.vocab_size, 32000);
}

TEST(Npy, RoundTrip) {
  auto dir = temp_dir("npy");
  auto t = torch::randn({3, 5});
  save_npy(dir + "/a.npy", t);
  EXPECT_TRUE(torch::equal(load_npy(dir + "/a.npy"), t));
  std::string raw = read_file(dir + "/a.npy", FileKind::Dataset);
  EXPECT_EQ(raw.substr(1, 5), "NUMPY");
  EXPECT_NE(raw.find("'shape': (3, 5)"), std::string::npos);
}

TEST(Tokenizer, WrongTypesInAddedTokensAreNamedWithTheirFile) {
  auto dir = temp_dir("added_types");
  train_tokenizer(gridvqa_corpus(), dir, 400);
  const std::string good = read_file(dir + "/added_tokens.json", FileKind::Dataset);
  write_bytes(dir + "/added_tokens.json", R"({"<image>": "four hundred"})");
  auto e = error_of([&] { Tokenizer t(dir); });
  EXPECT_NE(e.find("added_tokens.json: token '<image>' must map to an integer id"), std::string::npos) << e;
  write_bytes(dir + "/added_tokens.json", good);
  const std::string good_cfg = read_file(dir + "/tokenizer_config.json", FileKind::Dataset);
  auto cfg = nlohmann::json::parse(good_cfg);
  cfg["added_tokens_decoder"]["x7"] = {{"content", "<zz>"}};
  write_bytes(dir + "/tokenizer_config.json", cfg.dump());
  e = error_of([&] { Tokenizer t(dir); });
  EXPECT_NE(e.find("tokenizer_config.json: added_tokens_decoder key 'x7' is not a token id"), std::string::npos) << e;
  for (auto [bad, why] : {std::pair<std::string, std::string>{"-3", "is not a token id"},
                          {"99999999999999999999", "is not a token id"}, {"", "is not a token id"}}) {
    auto c = nlohmann::json::parse(good_cfg);
    c["added_tokens_decoder"][bad] = {{"content", "<zz>"}};
    write_bytes(dir + "/tokenizer_config.json", c.dump());
    e = error_of([&] { Tokenizer t(dir); });
    EXPECT_NE(e.find("tokenizer_config.json: added_tokens_decoder key '" + bad + "' " + why), std::string::npos) << e;
  }
  write_bytes(dir + "/tokenizer_config.json", R"({"added_tokens_decoder": [1, 2]})");
  e = error_of([&] { Tokenizer t(dir); });
  EXPECT_NE(e.find("tokenizer_config.json: added_tokens_decoder must be an object"), std::string::npos) << e;
  write_bytes(dir + "/tokenizer_config.json", "[]");
  e = error_of([&] { Tokenizer t(dir); });
  EXPECT_NE(e.find("tokenizer_config.json: must be a JSON object"), std::string::npos) << e;
  write_bytes(dir + "/tokenizer_config.json", "{}");
  write_bytes(dir + "/added_tokens.json", R"({"": 7})");
  e = error_of([&] { Tokenizer t(dir); });
  EXPECT_NE(e.find("added_tokens.json: an added token is the empty string"), std::string::npos) << e;
}

TEST(Tokenizer, FromBytesReadsWhatTheFolderHolds) {
  // The in-memory loader (the fuzz target's) and the folder loader agree on every id.
  auto dir = temp_dir("from_bytes");
  train_tokenizer(gridvqa_corpus(), dir, 400);
  Tokenizer a(dir);
  Tokenizer b = Tokenizer::from_bytes(read_file(dir + "/tokenizer.model", FileKind::Dataset), "m", read_file(dir + "/added_tokens.json", FileKind::Dataset),
                                      "a", read_file(dir + "/tokenizer_config.json", FileKind::Dataset), "c");
  EXPECT_EQ(a.vocab_size(), b.vocab_size());
  const std::string text = "USER: <image>\nwhat color is the square in row 2? ASSISTANT: red</s>";
  EXPECT_EQ(a.encode(text), b.encode(text));
  EXPECT_EQ(a.token_id("<image>"), b.token_id("<image>"));
  Tokenizer bare = Tokenizer::from_model_bytes(read_file(dir + "/tokenizer.model", FileKind::Dataset), "m");
  EXPECT_NE(bare.encode("<image>"), a.encode("<image>"));  // without the added tokens it is text
}

namespace {
// A safetensors file from a header object and raw data bytes.
std::string safetensors_bytes(const json& header, const std::string& data) {
  std::string h = header.dump();
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = char((uint64_t(h.size()) >> (8 * i)) & 0xff);
  return out + h + data;
}
}  // namespace

TEST(Safetensors, HostileHeadersAreRefusedBeforeAllocating) {
  auto dir = temp_dir("hostile");
  const std::string p = dir + "/m.safetensors";
  // 2^62 x 8 floats: the byte size overflows size_t and wrapped to a small number before.
  write_bytes(p, safetensors_bytes({{"t", {{"dtype", "F32"}, {"shape", {int64_t(1) << 62, 8}}, {"data_offsets", {0, 0}}}}}, ""));
  auto e = error_of([&] { SafetensorsFile f(p); });
  EXPECT_NE(e.find("tensor 't': shape too large"), std::string::npos) << e;
  EXPECT_EQ(e.rfind(p, 0), 0u) << e;
  // Two tensors over the same bytes.
  write_bytes(p, safetensors_bytes({{"a", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}}},
                                    {"b", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {4, 12}}}}},
                                   std::string(12, '\0')));
  EXPECT_NE(error_of([&] { SafetensorsFile f(p); }).find("overlap"), std::string::npos);
  // Offsets that are not non-negative integers, a dimension that is a string.
  write_bytes(p, safetensors_bytes({{"a", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {-8, 0}}}}}, ""));
  EXPECT_NE(error_of([&] { SafetensorsFile f(p); }).find("tensor 'a': malformed header entry"), std::string::npos);
  write_bytes(p, safetensors_bytes({{"a", {{"dtype", "F32"}, {"shape", {"2"}}, {"data_offsets", {0, 8}}}}}, std::string(8, '\0')));
  EXPECT_NE(error_of([&] { SafetensorsFile f(p); }).find("tensor 'a': malformed header entry"), std::string::npos);
}

TEST(Safetensors, ShardsAreConfinedAndTensorsUnique) {
  auto dir = temp_dir("shards_hostile");
  std::vector<std::pair<std::string, torch::Tensor>> ts;
  for (int i = 0; i < 4; ++i) ts.emplace_back("w" + std::to_string(i), torch::full({100}, float(i)));
  save_checkpoint_tensors(dir, ts, 800);
  const std::string index = dir + "/model.safetensors.index.json";
  const json good = json::parse(read_file(index, FileKind::Dataset));
  // A shard name that leaves the model folder, an absolute one, one that is not a safetensors file.
  for (const std::string bad : {"../outside.safetensors", "/etc/passwd", "sub/x.safetensors", "config.json"}) {
    json j = good;
    j["weight_map"]["w0"] = bad;
    write_bytes(index, j.dump());
    auto e = error_of([&] { TensorStore s(dir); });
    EXPECT_NE(e.find("weight_map['w0'] = '" + bad + "' is not a *.safetensors file name in the model folder"),
              std::string::npos) << e;
  }
  // The index names the wrong shard for a tensor.
  json j = good;
  const std::string s0 = j["weight_map"]["w0"], s3 = j["weight_map"]["w3"];
  ASSERT_NE(s0, s3);
  j["weight_map"]["w0"] = s3;
  write_bytes(index, j.dump());
  auto e = error_of([&] { TensorStore s(dir); });
  EXPECT_NE(e.find("tensor 'w0' listed in shard '" + s3 + "' but stored in"), std::string::npos) << e;
  // The same tensor in two files (no index: every *.safetensors is read) is refused, naming both.
  fs::remove(index);
  save_safetensors(dir + "/zz-extra.safetensors", {{"w1", torch::zeros({100})}});
  e = error_of([&] { TensorStore s(dir); });
  EXPECT_NE(e.find("tensor 'w1' is stored twice"), std::string::npos) << e;
  EXPECT_NE(e.find("zz-extra.safetensors"), std::string::npos) << e;
}

TEST(Checkpoint, ProjectionBiasesAndHugeConfigsAreRefusedByName) {
  auto dir = temp_dir("bias");
  Vlm m = Vlm::random(tiny_config(), 1);
  m.save(dir);
  {  // a Qwen-style q_proj bias the LLaMA forward would silently skip
    SafetensorsFile f(dir + "/model.safetensors");
    std::vector<std::pair<std::string, torch::Tensor>> ts;
    for (auto& [n, i] : f.tensors()) ts.emplace_back(n, f.load(n).clone());
    ts.emplace_back("language_model.model.layers.0.self_attn.q_proj.bias", torch::ones({tiny_config().text.hidden_size}));
    save_safetensors(dir + "/model.safetensors", ts);
  }
  auto e = error_of([&] { Vlm::load(dir); });
  EXPECT_NE(e.find("'language_model.model.layers.0.self_attn.q_proj.bias' is a bias on a LLaMA projection"),
            std::string::npos) << e;
  const json cfg = config_to_json(tiny_config());
  for (const char* key : {"attention_bias", "mlp_bias"}) {
    json j = cfg;
    j["text_config"][key] = true;
    e = error_of([&] { config_from_json(j, "c.json"); });
    EXPECT_NE(e.find(std::string("text_config.") + key + ": biases on the LLaMA projections are not supported"),
              std::string::npos) << e;
  }
  {  // RoPE scaling (linear, dynamic, llama3, ...) changes every position's rotation: refused.
    json j = cfg;
    j["text_config"]["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
    e = error_of([&] { config_from_json(j, "c.json"); });
    EXPECT_NE(e.find("text_config.rope_scaling: RoPE scaling is not supported"), std::string::npos) << e;
  }
  // 10^9 layers ended in std::bad_alloc: now refused by name before anything is allocated.
  json j = cfg;
  j["text_config"]["num_hidden_layers"] = 1000000000;
  write_bytes(dir + "/config.json", j.dump());
  e = error_of([&] { Vlm::load(dir); });
  EXPECT_NE(e.find("text_config.num_hidden_layers"), std::string::npos) << e;
  EXPECT_NE(e.find("more than victor accepts"), std::string::npos) << e;
  j = cfg;
  j["text_config"]["vocab_size"] = int64_t(1) << 30;
  EXPECT_NE(error_of([&] { config_from_json(j, "c.json").validate(); }).find("vocab_size"), std::string::npos);
}

TEST(Image, OnlyDocumentedFormatsAndSizesAreDecoded) {
  Image img;
  img.width = 4;
  img.height = 3;
  img.rgb.assign(36, 7);
  std::string png = encode_png(img);
  // A PNG whose header claims 8192 x 9000 pixels (stb itself refuses only past 1 GiB): refused
  // from the header, before 221 MB of pixels are allocated.
  std::string big = png;
  const std::string wh("\0\0\x20\x00\0\0\x23\x28", 8);  // IHDR width, height (big-endian)
  big.replace(16, 8, wh);
  auto e = error_of([&] { decode_image(big, "big.png"); });
  EXPECT_NE(e.find("big.png: image of 8192 x 9000 pixels is larger than victor decodes (64 Mpx)"), std::string::npos) << e;
  // A TGA (stb reads it, victor documents PNG, JPEG and BMP only; TGA has no magic to tell it by).
  std::string tga = std::string("\0\0\2\0\0\0\0\0\0\0\0\0\1\0\1\0\x18\0", 18) + "\1\2\3";
  e = error_of([&] { decode_image(tga, "x.tga"); });
  EXPECT_NE(e.find("x.tga: not a readable image (not PNG, JPEG or BMP"), std::string::npos) << e;
  int w = 0, h = 0;
  EXPECT_FALSE(image_dimensions(tga, &w, &h));
  EXPECT_TRUE(image_dimensions(png, &w, &h));
  EXPECT_EQ(w, 4);
  EXPECT_EQ(h, 3);
}

TEST(Tokenizer, UnsupportedNormalizerAndMalformedBytePiecesAreRefused) {
  const std::string model = read_file(std::string(VICTOR_SOURCE_DIR) + "/tests/fixtures/victor-m3-k2/tokenizer.model", FileKind::Dataset);
  EXPECT_NO_THROW(Tokenizer::from_model_bytes(model, "ok.model"));
  // NormalizerSpec { name: "nmt_nfkc" }: victor would split un-normalized text: other ids.
  const std::string nfkc = std::string("\x1a\x0a\x0a\x08", 4) + "nmt_nfkc";
  auto e = error_of([&] { Tokenizer::from_model_bytes(model + nfkc, "n.model"); });
  EXPECT_NE(e.find("n.model: SentencePiece normalizer 'nmt_nfkc' is not supported"), std::string::npos) << e;
  // A byte piece (type 6) that is not <0xAB>: used to reach std::stoi and escape as a raw error.
  const std::string piece = std::string("\x0a\x0a\x0a\x06", 4) + "<0xZZ>" + std::string("\x18\x06", 2);
  e = error_of([&] { Tokenizer::from_model_bytes(model + piece, "b.model"); });
  EXPECT_NE(e.find("b.model: byte piece"), std::string::npos) << e;
  EXPECT_NE(e.find("not of the form <0xAB>"), std::string::npos) << e;
}

TEST(Image, JpegDecodesThroughLibjpegAndHostileJpegsAreErrors) {
  Image img;
  img.width = 16;
  img.height = 8;
  for (int y = 0; y < 8; ++y)
    for (int x = 0; x < 16; ++x)
      for (int c = 0; c < 3; ++c) img.rgb.push_back(uint8_t(c == 0 ? x * 16 : c == 1 ? y * 32 : 128));
  std::string jpg;
  auto sink = [](void* ctx, void* data, int size) { static_cast<std::string*>(ctx)->append(static_cast<char*>(data), size_t(size)); };
  ASSERT_TRUE(stbi_write_jpg_to_func(sink, &jpg, img.width, img.height, 3, img.rgb.data(), 95));
  Image back = decode_image(jpg, "a.jpg");
  ASSERT_EQ(back.width, 16);
  ASSERT_EQ(back.height, 8);
  double err = 0;
  for (size_t i = 0; i < img.rgb.size(); ++i) err += std::abs(int(back.rgb[i]) - int(img.rgb[i]));
  EXPECT_LT(err / double(img.rgb.size()), 6.0);  // lossy, but the same picture
  int w = 0, h = 0;
  EXPECT_TRUE(image_dimensions(jpg, &w, &h));
  EXPECT_EQ(w, 16);
  // Truncated inside the header, and the crafted Huffman table fuzzing found (stb read past its
  // table on it): errors naming the file, or an image, never a crash.
  auto e = error_of([&] { decode_image(jpg.substr(0, 40), "cut.jpg"); });
  EXPECT_NE(e.find("cut.jpg: not a readable image (JPEG: "), std::string::npos) << e;
  const std::string crafted =
      read_file(std::string(VICTOR_SOURCE_DIR) + "/tests/fuzz/corpus/image/regression-stb-jpeg-huffman.jpg", FileKind::Dataset);
  e = error_of([&] { decode_image(crafted, "crafted.jpg"); });
  EXPECT_TRUE(e.empty() || e.rfind("crafted.jpg: ", 0) == 0) << e;
}

TEST(Image, PngChunksMustLieInsideTheFileBeforeStbAllocates) {
  // Found by fuzzing (2026-12-03): stb sized its buffer by an IDAT chunk's declared length before
  // reading it, so ~200 bytes made it allocate 2 GB. Such a file is now refused by its chunks.
  Image img;
  img.width = 5;
  img.height = 4;
  img.rgb.assign(60, 200);
  const std::string png = encode_png(img);
  ASSERT_EQ(decode_image(png, "ok.png").width, 5);
  // After the signature (8) and IHDR (25 bytes): an IDAT claiming 2^31 - 16 bytes.
  std::string lying = png;
  lying.insert(33, std::string("\x7f\xff\xff\xf0" "IDAT" "\0\0\0\0", 12));
  auto e = error_of([&] { decode_image(lying, "lying.png"); });
  EXPECT_NE(e.find("lying.png: not a readable image (PNG: chunk 'IDAT' declares 2147483632 bytes, the file has"),
            std::string::npos) << e;
  // A length past 2^31 - 1 (the PNG limit), and a file cut before IEND.
  std::string huge = png;
  huge.insert(33, std::string("\xff\xff\xff\xf0" "tEXt", 8));
  EXPECT_NE(error_of([&] { decode_image(huge, "h.png"); }).find("chunk 'tEXt' declares 4294967280 bytes"), std::string::npos);
  e = error_of([&] { decode_image(png.substr(0, png.size() - 12), "cut.png"); });
  EXPECT_NE(e.find("cut.png: not a readable image (PNG: truncated before its IEND chunk)"), std::string::npos) << e;
  // The fuzzer's own input: refused, or decoded, never 2 GB.
  const std::string found =
      read_file(std::string(VICTOR_SOURCE_DIR) + "/tests/fuzz/corpus/image/regression-stb-png-idat-declared-2gb.png", FileKind::Dataset);
  e = error_of([&] { decode_image(found, "found.png"); });
  EXPECT_TRUE(e.empty() || e.rfind("found.png: ", 0) == 0) << e;
}

TEST(Image, ThinStripsAreRefusedBeforePaddingOrResizingThemHuge) {
  // Found by fuzzing: a 909-byte BMP of 24 x 8208 pixels padded to an 8208^2 square (202 MB)
  // before resizing; a 1 x 60000 PNG would have asked for 10 GB.
  Image strip;
  strip.width = 1;
  strip.height = 60000;
  strip.rgb.assign(size_t(3) * 60000, 9);
  const uint8_t fill[3] = {0, 0, 0};
  auto e = error_of([&] { pad_to_square(strip, fill); });
  EXPECT_NE(e.find("image of 1 x 60000 pixels: padded to a square it would be 60000 x 60000"), std::string::npos) << e;
  PreprocessConfig p;  // LLaVA's 336 / 336
  p.pad_to_square = false;
  e = error_of([&] { preprocess_image(strip, p); });
  EXPECT_NE(e.find("aspect ratio too extreme"), std::string::npos) << e;
  const std::string bmp = read_file(std::string(VICTOR_SOURCE_DIR) + "/tests/fuzz/corpus/image/regression-thin-strip-pad.bmp", FileKind::Dataset);
  Image img = decode_image(bmp, "strip.bmp");
  EXPECT_EQ(img.width, 24);
  EXPECT_EQ(img.height, 8208);
  p.pad_to_square = true;
  EXPECT_NE(error_of([&] { preprocess_image(img, p); }).find("padded to a square"), std::string::npos);
}

TEST(Image, JpegCutInsideItsDataIsRefusedAsPilRefusesIt) {
  Image img;
  img.width = 64;
  img.height = 64;
  for (int i = 0; i < 64 * 64 * 3; ++i) img.rgb.push_back(uint8_t((i * 37) % 251));
  std::string jpg;
  auto sink = [](void* ctx, void* data, int size) { static_cast<std::string*>(ctx)->append(static_cast<char*>(data), size_t(size)); };
  ASSERT_TRUE(stbi_write_jpg_to_func(sink, &jpg, img.width, img.height, 3, img.rgb.data(), 90));
  EXPECT_EQ(decode_image(jpg, "whole.jpg").width, 64);
  // Cut at 60%: past the header, inside the entropy-coded data (libjpeg would fill grey).
  auto e = error_of([&] { decode_image(jpg.substr(0, jpg.size() * 6 / 10), "cut.jpg"); });
  EXPECT_NE(e.find("cut.jpg: not a readable image (JPEG: truncated"), std::string::npos) << e;
}

TEST(Image, PngDimensionsComeFromItsHeaderEvenBeyondWhatStbReads) {
  // A PNG declaring 100000 x 100000 is too large (a 413 in the server), not unreadable (400).
  std::string png("\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\x01\x86\xa0\0\x01\x86\xa0\x08\x02\0\0\0\0\0\0\0", 33);
  int w = 0, h = 0;
  ASSERT_TRUE(image_dimensions(png, &w, &h));
  EXPECT_EQ(w, 100000);
  EXPECT_EQ(h, 100000);
}

TEST(Files, ReadsOnlyRegularFilesWithinTheirKindsCap) {
  auto dir = temp_dir("files");
  write_bytes(dir + "/a.json", "{}");
  EXPECT_EQ(read_file(dir + "/a.json", FileKind::Json), "{}");
  EXPECT_NE(error_of([&] { read_file("/dev/zero", FileKind::Image); }).find("/dev/zero: a character device"), std::string::npos);
  EXPECT_NE(error_of([&] { read_file(dir, FileKind::Json); }).find("a folder"), std::string::npos);
  ASSERT_EQ(::mkfifo((dir + "/fifo").c_str(), 0600), 0);
  EXPECT_NE(error_of([&] { read_file(dir + "/fifo", FileKind::Json); }).find("a FIFO"), std::string::npos);  // never blocks
  fs::create_symlink("/dev/urandom", dir + "/link.png");
  EXPECT_NE(error_of([&] { read_file(dir + "/link.png", FileKind::Image); }).find("character device"), std::string::npos);
  // Over the cap: refused from its size, before reading (a sparse file costs no disk).
  { std::ofstream(dir + "/big.json"); }
  fs::resize_file(dir + "/big.json", max_file_bytes(FileKind::Json) + 1);
  EXPECT_NE(error_of([&] { read_file(dir + "/big.json", FileKind::Json); }).find("more than the 64 MiB victor reads for JSON files"),
            std::string::npos);
  // A /proc file reports size 0 and is still read whole.
  EXPECT_NE(read_file("/proc/self/status", FileKind::Log).find("Pid:"), std::string::npos);
}

TEST(Files, TheSweepTakesOnlyTemporariesOfDeadVictorProcesses) {
  auto dir = temp_dir("sweep");
  for (const char* user : {"thesis.tmp2024", "notes.tmp", "a.victor-tmp-", "b.victor-tmp-12", "c.victor-tmp-x-1"})
    write_bytes(dir + "/" + user, "mine");
  write_bytes(dir + "/model.safetensors.victor-tmp-999999999-3", "stale");  // no such pid
  const std::string live = "config.json.victor-tmp-" + std::to_string(::getpid()) + "-0";
  write_bytes(dir + "/" + live, "being written");
  EXPECT_FALSE(is_victor_temporary("thesis.tmp2024"));
  EXPECT_TRUE(is_victor_temporary("model.safetensors.victor-tmp-12-0"));
  EXPECT_EQ(remove_stale_temporaries(dir), 1);
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors.victor-tmp-999999999-3"));
  for (const char* user : {"thesis.tmp2024", "notes.tmp", "a.victor-tmp-", "b.victor-tmp-12", "c.victor-tmp-x-1"})
    EXPECT_TRUE(fs::exists(dir + "/" + user)) << user;
  EXPECT_TRUE(fs::exists(dir + "/" + live));
}

TEST(Files, AModelWriteMarksTheFolderFromItsFirstReplacedFileUntilCommit) {
  auto dir = temp_dir("mfw");
  const std::string marker = dir + "/" + kIncompleteMarker;
  {
    ModelFolderWrite w(dir);
    EXPECT_FALSE(fs::exists(marker));  // nothing replaced yet: a failure here leaves the old model
    write_file_atomic(dir + "/config.json", "{}");
    EXPECT_TRUE(fs::exists(marker));
    EXPECT_NE(error_of([&] { check_model_folder_complete(dir); }).find("incomplete"), std::string::npos);
    {
      ModelFolderWrite inner(dir);  // Vlm::save inside a checkpoint: shares the outer marker
      write_file_atomic(dir + "/model.safetensors", "x");
      inner.commit();
    }
    EXPECT_TRUE(fs::exists(marker));
    w.commit();
  }
  EXPECT_FALSE(fs::exists(marker));
  EXPECT_EQ(error_of([&] { check_model_folder_complete(dir); }), "");
  {
    ModelFolderWrite w(dir);
    write_file_atomic(dir + "/config.json", "{\"a\": 1}");
  }  // no commit: an exception or a kill mid-write
  EXPECT_TRUE(fs::exists(marker));
  EXPECT_NE(error_of([&] { Vlm::load(dir); }).find("incomplete"), std::string::npos);
  EXPECT_NE(error_of([&] { Tokenizer t(dir); }).find("incomplete"), std::string::npos);
}

namespace {
volatile sig_atomic_t g_terms_seen = 0;
void count_term(int) { g_terms_seen = g_terms_seen + 1; }
}  // namespace

// The launcher stops the other ranks with SIGTERM when one fails: a rank inside its checkpoint
// must finish it first (CI once found the last checkpoint marked incomplete that way).
TEST(Files, AStopSignalWaitsForAnOpenModelWriteAndThenActs) {
  auto dir = temp_dir("mfw_signal");
  struct sigaction counting {}, old {};
  counting.sa_handler = count_term;
  sigemptyset(&counting.sa_mask);
  ASSERT_EQ(sigaction(SIGTERM, &counting, &old), 0);
  g_terms_seen = 0;
  {
    ModelFolderWrite w(dir);
    write_file_atomic(dir + "/config.json", "{}");
    raise(SIGTERM);
    {
      ModelFolderWrite inner(dir);  // nested: the outer write still holds the signal
      inner.commit();
    }
    raise(SIGTERM);
    EXPECT_EQ(g_terms_seen, 0);
    w.commit();
    EXPECT_EQ(g_terms_seen, 1);  // once, to the handler that was there before
  }
  {
    ModelFolderWrite w(dir);
    write_file_atomic(dir + "/config.json", "{}");
    raise(SIGTERM);
    EXPECT_EQ(g_terms_seen, 1);
  }  // destroyed without commit (an exception): the signal acts all the same
  EXPECT_EQ(g_terms_seen, 2);
  raise(SIGTERM);  // no write open: at once
  EXPECT_EQ(g_terms_seen, 3);
  sigaction(SIGTERM, &old, nullptr);
}

TEST(Files, OutputsNeverLandOnInputsOrInsideAModelFolder) {
  auto dir = temp_dir("outs");
  write_bytes(dir + "/q.jsonl", "{}\n");
  fs::create_hard_link(dir + "/q.jsonl", dir + "/same.jsonl");
  EXPECT_NE(error_of([&] { refuse_output_over_inputs("--answers-out", dir + "/q.jsonl", {dir + "/q.jsonl"}); })
                .find("is one of this command's inputs"),
            std::string::npos);
  EXPECT_NE(error_of([&] { refuse_output_over_inputs("--answers-out", dir + "/./same.jsonl", {dir + "/q.jsonl"}); }), "");
  EXPECT_EQ(error_of([&] { refuse_output_over_inputs("--answers-out", dir + "/a.jsonl", {dir + "/q.jsonl"}); }), "");
  fs::create_directories(dir + "/m");
  write_bytes(dir + "/m/config.json", "{}");
  EXPECT_NE(error_of([&] { refuse_output_over_inputs("--json-out", dir + "/m/config.json", {}); }).find("inside the model folder"),
            std::string::npos);
  EXPECT_EQ(error_of([&] { refuse_output_over_inputs("--json-out", dir + "/m/new.json", {}); }), "");
  EXPECT_NE(error_of([&] { refuse_existing_model(dir + "/m", false, "--out"); }).find("--overwrite"), std::string::npos);
  EXPECT_EQ(error_of([&] { refuse_existing_model(dir + "/m", true, "--out"); }), "");
  write_bytes(dir + "/m/" + kIncompleteMarker, "");  // an interrupted write: nothing that loads
  EXPECT_EQ(error_of([&] { refuse_existing_model(dir + "/m", false, "--out"); }), "");
}

namespace {
// A noisy image (the hardest case for resizing) with `channels` 1 (grey), 3 or 4 (RGBA) saved as PNG.
std::string noisy_png(const std::string& path, int w, int h, int channels, uint32_t seed) {
  std::vector<uint8_t> px(size_t(w) * h * channels);
  uint32_t s = seed;
  for (auto& v : px) {
    s = s * 1664525u + 1013904223u;
    v = uint8_t(s >> 24);
  }
  EXPECT_TRUE(stbi_write_png(path.c_str(), w, h, channels, px.data(), w * channels));
  return path;
}
}  // namespace

TEST(Image, PreprocessingEqualsThePillowReferenceOfEachProcessor) {
  // tests/preprocess_reference.py does transformers' steps with PIL and NumPy; victor must give
  // the same pixels for CLIPImageProcessor (resize + center crop, no pad) and LlavaImageProcessor
  // with do_pad, on wide, tall, tiny and large images, RGBA and greyscale.
  if (std::system("/usr/bin/python3 -c 'import PIL, numpy' > /dev/null 2>&1") != 0)
    GTEST_SKIP() << "Debian's python3-pil and python3-numpy are not installed (scripts/setup.sh installs them)";
  auto dir = temp_dir("preproc");
  struct Case {
    int w, h, channels, shortest;
  };
  const Case cases[] = {{143, 97, 3, 56}, {97, 143, 3, 56}, {5, 3, 3, 28}, {1500, 1100, 3, 336},
                        {120, 80, 4, 56}, {80, 121, 1, 56}, {64, 64, 3, 56}};
  int n = 0;
  for (const auto& c : cases) {
    const std::string png = noisy_png(dir + "/img" + std::to_string(n) + ".png", c.w, c.h, c.channels, uint32_t(n + 1));
    const Image img = load_image(png);
    for (bool pad : {false, true}) {
      PreprocessConfig p;
      p.shortest_edge = p.crop_size = c.shortest;
      p.pad_to_square = pad;
      const std::string npy = dir + "/ref" + std::to_string(n) + (pad ? "p" : "c") + ".npy";
      const std::string cmd = "/usr/bin/python3 '" + std::string(VICTOR_SOURCE_DIR) + "/tests/preprocess_reference.py' '" + png +
                              "' '" + npy + "' " + (pad ? "pad" : "crop") + " " + std::to_string(c.shortest) + " " +
                              std::to_string(c.shortest);
      ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
      const auto ref = load_npy(npy), got = preprocess_image(img, p);
      ASSERT_EQ(ref.sizes(), got.sizes()) << c.w << "x" << c.h;
      // Bit for bit: the same uint8 pixels after PIL's bicubic, the same float32 arithmetic after.
      const double diff = (ref - got).abs().max().item<double>();
      EXPECT_EQ(diff, 0.0) << c.w << "x" << c.h << " channels " << c.channels << (pad ? " padded" : " cropped")
                           << ": max |diff| " << diff << " (" << diff * 0.27 * 255 << " grey levels)";
    }
    ++n;
  }
}

TEST(Image, AnyResPreprocessingEqualsThePillowReferenceOfLlavaNextImageProcessor) {
  // LLaVA-NeXT: the base view and every crop of the chosen pinpoint, bit for bit, on wide, tall,
  // tiny, huge, RGBA and greyscale images, with llava-v1.6's pinpoints (scaled to 56-pixel views)
  // and an uneven list.
  if (std::system("/usr/bin/python3 -c 'import PIL, numpy' > /dev/null 2>&1") != 0)
    GTEST_SKIP() << "Debian's python3-pil and python3-numpy are not installed (scripts/setup.sh installs them)";
  auto dir = temp_dir("anyres");
  struct Case {
    int w, h, channels;
  };
  const Case cases[] = {{143, 97, 3}, {97, 143, 3}, {5, 3, 3}, {1500, 1100, 3}, {120, 80, 4},
                        {80, 121, 1},  {300, 40, 3}, {56, 56, 3}, {112, 112, 3}};
  ModelConfig c = preset_config("llava-next-tiny");
  c.vision.image_size = 56;
  c.vision.patch_size = 14;
  c.preprocess.crop_size = c.preprocess.shortest_edge = 56;
  for (const auto& pins : {std::vector<Pinpoint>{{56, 112}, {112, 56}, {112, 112}, {168, 56}, {56, 168}},
                           std::vector<Pinpoint>{{168, 112}, {56, 56}, {112, 224}}}) {
    c.image_grid_pinpoints = pins;
    c.validate();
    std::string pj = "[";
    for (auto& p : pins) pj += (pj.size() > 1 ? "," : "") + std::string("[") + std::to_string(p[0]) + "," + std::to_string(p[1]) + "]";
    pj += "]";
    int n = 0;
    for (const auto& k : cases) {
      const std::string png = noisy_png(dir + "/img" + std::to_string(n) + ".png", k.w, k.h, k.channels, uint32_t(n + 7));
      const std::string npy = dir + "/ref" + std::to_string(n) + ".npy";
      const std::string cmd = "/usr/bin/python3 '" + std::string(VICTOR_SOURCE_DIR) + "/tests/preprocess_reference.py' '" +
                              png + "' '" + npy + "' anyres 56 56 '" + pj + "'";
      ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
      const auto ref = load_npy(npy);
      const PreparedImage got = prepare_image(load_image(png), c);
      ASSERT_EQ(ref.sizes(), got.pixels.sizes()) << k.w << "x" << k.h << " pinpoints " << pj;
      EXPECT_EQ(got.layout.views(), ref.size(0));
      EXPECT_EQ(got.layout.width, k.w);
      EXPECT_EQ(got.layout.height, k.h);
      const double diff = (ref - got.pixels).abs().max().item<double>();
      EXPECT_EQ(diff, 0.0) << k.w << "x" << k.h << " channels " << k.channels << " pinpoints " << pj;
      ++n;
    }
  }
}

TEST(Config, ThePreprocessorConfigDecidesPaddingUnlessConfigJsonDoes) {
  auto dir = temp_dir("procs");
  ModelConfig base = preset_config("tiny");
  save_config(base, dir);  // victor's own: image_aspect_ratio "pad" and LlavaImageProcessor do_pad
  EXPECT_TRUE(load_config(dir).preprocess.pad_to_square);
  EXPECT_EQ(json::parse(read_file(dir + "/preprocessor_config.json", FileKind::Json))["do_pad"], true);
  auto with = [&](const json& config_edit, const json& proc) {
    json cj = config_to_json(base);
    cj.erase("image_aspect_ratio");
    cj.update(config_edit);
    write_bytes(dir + "/config.json", cj.dump());
    write_bytes(dir + "/preprocessor_config.json", proc.dump());
    return load_config(dir);
  };
  const json clip = {{"image_processor_type", "CLIPImageProcessor"}, {"crop_size", {{"height", 28}, {"width", 28}}},
                     {"size", {{"shortest_edge", 28}}}};
  // The llava-1.5-hf layout: CLIPImageProcessor, no image_aspect_ratio: resize + crop, no pad.
  EXPECT_FALSE(with(json::object(), clip).preprocess.pad_to_square);
  // The original LLaVA layout's key outranks the processor.
  EXPECT_TRUE(with({{"image_aspect_ratio", "pad"}}, clip).preprocess.pad_to_square);
  json llava = clip;
  llava["image_processor_type"] = "LlavaImageProcessor";
  EXPECT_FALSE(with(json::object(), llava).preprocess.pad_to_square);  // do_pad defaults to false
  llava["do_pad"] = true;
  EXPECT_TRUE(with(json::object(), llava).preprocess.pad_to_square);
  json c2 = clip;
  c2["rescale_factor"] = 0.5;
  c2["do_normalize"] = false;
  auto p = with(json::object(), c2).preprocess;
  EXPECT_EQ(p.rescale_factor, 0.5);
  EXPECT_FALSE(p.do_normalize);
  // Options victor does not implement are refused by name.
  auto refused = [&](const char* key, const json& value, const std::string& expect) {
    json proc = clip;
    proc[key] = value;
    const std::string e = error_of([&] { with(json::object(), proc); });
    EXPECT_NE(e.find(expect), std::string::npos) << key << ": " << e;
  };
  refused("image_processor_type", "LlavaNextImageProcessor", "AnyRes");
  refused("image_processor_type", "SiglipImageProcessor", "'SiglipImageProcessor' is not supported");
  refused("resample", 2, "resample 2 is not implemented");
  refused("do_center_crop", false, "do_center_crop false is not implemented");
  refused("size", {{"height", 28}, {"width", 28}}, "a fixed height x width");
  refused("crop_size", {{"height", 28}, {"width", 14}}, "not square");
}
