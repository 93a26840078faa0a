// victor serve: the request parser, batched decode over per-request caches, the engine's
// continuous batching, the image cache, every limit, and the HTTP server end to end.
#include <arpa/inet.h>
#include <httplib.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <malloc.h>

#include <atomic>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <thread>

#include "helpers.h"
#include "victor/bench.h"
#include "victor/gridvqa.h"
#include "victor/error.h"
#include "victor/files.h"
#include "victor/generate.h"
#include "victor/image.h"
#include "victor/serve/server.h"
#include "victor/tokenizer.h"

using namespace victor;
using namespace victor::test;
using nlohmann::json;

namespace {

// A tiny model with a real tokenizer, shared by the tests of this file.
struct ServeFixture {
  std::string dir;
  std::unique_ptr<Tokenizer> tok;
  std::unique_ptr<Vlm> model;
  ServeFixture(const std::string& name, const Reducer& reducer, bool next = false) {
    dir = temp_dir("serve_" + name);
    train_tokenizer(gridvqa_corpus(), dir, 400);
    tok = std::make_unique<Tokenizer>(dir);
    ModelConfig cfg = preset_config("tiny");
    cfg.text.vocab_size = 448;
    cfg.image_token_index = tok->token_id("<image>");
    cfg.pad_token_id = tok->token_id("<pad>");
    cfg.reducer = reducer;
    if (next) cfg.image_grid_pinpoints = preset_config("llava-next-tiny").image_grid_pinpoints, cfg.preprocess.pad_to_square = false;
    model = std::make_unique<Vlm>(Vlm::random(cfg, 11));
  }
};


std::string data_url(const Image& img) { return "data:image/png;base64," + base64_encode(encode_png(img)); }

json user_message(const std::string& text, const std::vector<std::string>& urls) {
  json content = json::array();
  for (auto& u : urls) content.push_back({{"type", "image_url"}, {"image_url", {{"url", u}}}});
  content.push_back({{"type", "text"}, {"text", text}});
  return {{"role", "user"}, {"content", content}};
}

json request(const std::vector<json>& messages, int max_tokens, double temperature = 0, uint64_t seed = 0) {
  return {{"messages", messages}, {"max_tokens", max_tokens}, {"temperature", temperature}, {"seed", seed}};
}

// What `victor generate` gives for one request.
GenerationResult reference(const ServeFixture& f, const std::string& prompt, const std::vector<Image>& images,
                           int max_new, double temperature = 0, uint64_t seed = 0, double top_p = 1.0) {
  SamplingOptions o;
  o.max_new_tokens = max_new;
  o.temperature = temperature;
  o.seed = seed;
  o.top_p = top_p;
  return generate(*f.model, *f.tok, {Request{prompt, images}}, o);
}

// A plain TCP connection to the server on loopback (-1 when refused).
int connect_local(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(uint16_t(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

int expect_api_error(const std::function<void()>& fn, const std::string& param) {
  try {
    fn();
  } catch (const ApiError& e) {
    EXPECT_EQ(e.param, param) << e.what();
    return e.status;
  }
  ADD_FAILURE() << "no ApiError for " << param;
  return 0;
}

// The body of every "data: " event of a server-sent-event stream, [DONE] excluded.
std::vector<json> sse_events(const std::string& body) {
  std::vector<json> out;
  size_t p = 0;
  while ((p = body.find("data: ", p)) != std::string::npos) {
    size_t end = body.find("\n\n", p);
    std::string data = body.substr(p + 6, end - p - 6);
    if (data != "[DONE]") out.push_back(json::parse(data));
    p = end;
  }
  return out;
}

template <class F>
bool eventually(F f, int ms = 20000) {
  for (int i = 0; i < ms / 10; ++i) {
    if (f()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return f();
}

}  // namespace

TEST(ServeApi, ParsesMessagesPartsAndOptions) {
  ServeLimits lim;
  const std::string url = data_url(lcg_image(28, 28, 1));
  json body = {{"model", "m"},
               {"messages",
                {{{"role", "system"}, {"content", "Be brief."}},
                 user_message("What is this?", {url}),
                 {{"role", "assistant"}, {"content", "a bag"}},
                 {{"role", "user"}, {"content", "Where?"}}}},
               {"max_tokens", 7},
               {"temperature", 0.5},
               {"top_p", 0.9},
               {"seed", 3},
               {"stop", {"\n", "END"}},
               {"stream", true},
               {"stream_options", {{"include_usage", true}}}};
  ChatRequest r = parse_chat_request(body.dump(), lim);
  ASSERT_EQ(r.turns.size(), 2u);
  EXPECT_EQ(r.turns[0].human, "Be brief.\n<image>\nWhat is this?");
  EXPECT_EQ(r.turns[0].assistant, "a bag");
  EXPECT_EQ(r.turns[1].human, "Where?");
  EXPECT_EQ(r.turns[1].assistant, "");
  ASSERT_EQ(r.images.size(), 1u);
  EXPECT_EQ(r.images[0].field, "messages[1].content[0].image_url.url");
  EXPECT_EQ(r.images[0].bytes, encode_png(lcg_image(28, 28, 1)));
  EXPECT_EQ(*r.max_tokens, 7);
  EXPECT_EQ(r.temperature, 0.5);
  EXPECT_EQ(r.top_p, 0.9);
  EXPECT_EQ(*r.seed, 3u);
  EXPECT_EQ(r.stop, (std::vector<std::string>{"\n", "END"}));
  EXPECT_TRUE(r.stream && r.include_usage);
}

TEST(ServeApi, Base64RoundTripAndRejects) {
  for (const std::string& s : std::vector<std::string>{"", "a", "ab", "abc", "abcd", std::string("\0\xff\x10\x80", 4)})
    EXPECT_EQ(base64_decode(base64_encode(s), "f"), s);
  EXPECT_EQ(base64_decode("aGVsbG8=", "f"), "hello");
  EXPECT_EQ(base64_decode("aGVs\nbG8", "f"), "hello");
  EXPECT_THROW(base64_decode("aGV*bG8=", "f"), ApiError);
  EXPECT_THROW(base64_decode("aGVsbG8=x", "f"), ApiError);  // data after padding
  EXPECT_THROW(base64_decode("a", "f"), ApiError);          // 6 bits: not a byte
}

TEST(ServeApi, BadRequestsNameTheirField) {
  ServeLimits lim;
  auto parse = [&](const std::string& body) { return [body, &lim] { parse_chat_request(body, lim); }; };
  const json ok_msg = json::array({user_message("hi", {})});
  EXPECT_EQ(expect_api_error(parse("{not json"), ""), 400);
  EXPECT_EQ(expect_api_error(parse("[1]"), ""), 400);
  EXPECT_EQ(expect_api_error(parse("{}"), "messages"), 400);
  EXPECT_EQ(expect_api_error(parse(json{{"messages", json::array()}}.dump()), "messages"), 400);
  EXPECT_EQ(expect_api_error(parse(json{{"messages", {{{"role", "robot"}, {"content", "x"}}}}}.dump()), "messages[0].role"), 400);
  EXPECT_EQ(expect_api_error(parse(json{{"messages", {{{"role", "assistant"}, {"content", "x"}}}}}.dump()), "messages[0]"), 400);
  EXPECT_EQ(expect_api_error(parse(json{{"messages", {user_message("hi", {}), {{"role", "assistant"}, {"content", "x"}}}}}.dump()),
                             "messages"),
            400);
  EXPECT_EQ(expect_api_error(parse(json{{"messages", {user_message("a <image> b", {})}}}.dump()), "messages"), 400);
  EXPECT_EQ(expect_api_error(parse(json{{"messages", {user_message("x", {"data:image/png;base64,@@@"})}}}.dump()),
                             "messages[0].content[0].image_url.url"),
            400);
  EXPECT_EQ(expect_api_error(parse(json{{"messages", {user_message("x", {"data:image/png,abc"})}}}.dump()),
                             "messages[0].content[0].image_url.url"),
            400);
  EXPECT_EQ(expect_api_error(parse(json{{"messages", {user_message("x", {"https://example.com/a.png"})}}}.dump()),
                             "messages[0].content[0].image_url.url"),
            400);
  EXPECT_EQ(expect_api_error(parse(json{{"messages", {user_message("x", {"/etc/passwd"})}}}.dump()),
                             "messages[0].content[0].image_url.url"),
            400);  // no --allow-files: no local paths at all
  json bad_part = {{"messages", {{{"role", "user"}, {"content", {{{"type", "audio"}}}}}}}};
  EXPECT_EQ(expect_api_error(parse(bad_part.dump()), "messages[0].content[0].type"), 400);
  EXPECT_EQ(expect_api_error(parse(json{{"messages", ok_msg}, {"max_tokens", 0}}.dump()), "max_tokens"), 400);
  EXPECT_EQ(expect_api_error(parse(json{{"messages", ok_msg}, {"max_tokens", 1e9}}.dump()), "max_tokens"), 400);
  EXPECT_EQ(expect_api_error(parse(json{{"messages", ok_msg}, {"temperature", "hot"}}.dump()), "temperature"), 400);
  EXPECT_EQ(expect_api_error(parse(json{{"messages", ok_msg}, {"temperature", 3}}.dump()), "temperature"), 400);
  EXPECT_EQ(expect_api_error(parse(json{{"messages", ok_msg}, {"top_p", -0.5}}.dump()), "top_p"), 400);
  EXPECT_EQ(expect_api_error(parse(json{{"messages", ok_msg}, {"n", 2}}.dump()), "n"), 400);
  EXPECT_EQ(expect_api_error(parse(json{{"messages", ok_msg}, {"stop", {1}}}.dump()), "stop[0]"), 400);
  EXPECT_EQ(expect_api_error(parse(json{{"messages", ok_msg}, {"stream", "yes"}}.dump()), "stream"), 400);
  // Limits: images per request, bytes per image.
  ServeLimits few = lim;
  few.max_images = 1;
  const std::string url = data_url(lcg_image(28, 28, 2));
  EXPECT_EQ(expect_api_error([&] { parse_chat_request(json{{"messages", {user_message("x", {url, url})}}}.dump(), few); },
                             "messages[0].content[1]"),
            400);
  ServeLimits small = lim;
  small.max_image_bytes = 100;
  EXPECT_EQ(expect_api_error([&] { parse_chat_request(json{{"messages", {user_message("x", {url})}}}.dump(), small); },
                             "messages[0].content[0].image_url.url"),
            413);
}

TEST(ServeApi, LocalFilesOnlyInsideTheAllowedFolder) {
  auto root = temp_dir("serve_files");
  std::filesystem::create_directories(root + "/imgs");
  save_png(lcg_image(28, 28, 4), root + "/imgs/a.png");
  save_png(lcg_image(28, 28, 5), root + "/secret.png");
  ServeLimits lim;
  lim.allow_files = root + "/imgs";
  auto body = [](const std::string& path) { return json{{"messages", {user_message("x", {path})}}}.dump(); };
  EXPECT_EQ(parse_chat_request(body(root + "/imgs/a.png"), lim).images[0].bytes, read_file(root + "/imgs/a.png", FileKind::Dataset));
  EXPECT_EQ(parse_chat_request(body("a.png"), lim).images[0].bytes, read_file(root + "/imgs/a.png", FileKind::Dataset));
  EXPECT_EQ(parse_chat_request(body("file://" + root + "/imgs/a.png"), lim).images.size(), 1u);
  const std::string field = "messages[0].content[0].image_url.url";
  EXPECT_EQ(expect_api_error([&] { parse_chat_request(body(root + "/secret.png"), lim); }, field), 403);
  EXPECT_EQ(expect_api_error([&] { parse_chat_request(body(root + "/imgs/../secret.png"), lim); }, field), 403);
  EXPECT_EQ(expect_api_error([&] { parse_chat_request(body("../secret.png"), lim); }, field), 403);
  EXPECT_EQ(expect_api_error([&] { parse_chat_request(body(root + "/imgs/none.png"), lim); }, field), 400);
  // A name that only starts with two dots is inside the folder.
  save_png(lcg_image(28, 28, 6), root + "/imgs/..dots.png");
  EXPECT_EQ(parse_chat_request(body("..dots.png"), lim).images.size(), 1u);
  EXPECT_EQ(parse_chat_request(body(root + "/imgs/..dots.png"), lim).images.size(), 1u);
}

TEST(ServeModel, BatchedDecodeOverPerRequestCachesEqualsEachAlone) {
  // Requests of different lengths (and images) decode together; every row must equal the same
  // request decoding alone, for the plain model, Victor (different cache lengths per layer) and
  // FastV (pruned caches).
  for (const Reducer& r : {Reducer::none(), Reducer::parse("victor:m=2,k=2"), Reducer::parse("fastv:k=1,keep=0.5")}) {
    ModelConfig c = tiny_config();
    c.reducer = r;
    Vlm m = Vlm::random(c, 5);
    torch::NoGradGuard ng;
    std::vector<PromptInput> prompts = {prompt(c, {5, 6}, {7}, random_pixels(1, 28, 1)),
                                        prompt(c, {8, 9, 10, 11, 12}, {13, 14}, random_pixels(1, 28, 2)),
                                        prompt(c, {15}, {}, torch::Tensor())};
    std::vector<KvCache> alone, together;
    for (auto& p : prompts) {
      for (auto* set : {&alone, &together}) {
        set->push_back(m.make_cache(1));
        m.forward(m.assemble({p}, true), &set->back());
      }
    }
    std::vector<KvCache*> ptrs;
    for (auto& k : together) ptrs.push_back(&k);
    for (int step = 0; step < 4; ++step) {
      auto ids = torch::tensor({int64_t(20 + step), int64_t(30 + step), int64_t(40 + step)});
      auto batched = m.decode_step(ids, ptrs);
      for (int b = 0; b < 3; ++b) {
        auto single = m.decode_step(ids.narrow(0, b, 1), alone[b]);
        EXPECT_TRUE(torch::allclose(batched[b], single[0], 1e-5, 1e-5))
            << r.spec() << " row " << b << " step " << step << " " << (batched[b] - single[0]).abs().max().item<float>();
        EXPECT_EQ(together[b].layers.back().len, alone[b].layers.back().len);
      }
    }
    EXPECT_THROW(m.decode_step(torch::tensor({int64_t(1)}), ptrs), Error);  // 1 id for 3 caches
  }
}

TEST(ServeEngine, InvalidUtf8IsReplacedAsBrowsersDo) {
  const std::string R = "\xEF\xBF\xBD";
  EXPECT_EQ(sanitize_utf8("a\xF0\x9F\x98\x80" "b\xC3\xA9"), "a\xF0\x9F\x98\x80" "b\xC3\xA9");  // valid stays
  EXPECT_EQ(sanitize_utf8("\xE2\x82" "A"), R + "A");         // a maximal subpart: one replacement
  EXPECT_EQ(sanitize_utf8("\xF0\x80"), R + R);               // F0 needs 90..BF next
  EXPECT_EQ(sanitize_utf8("\xED\xA0\x80"), R + R + R);       // a surrogate
  EXPECT_EQ(sanitize_utf8("\xC0\xAF"), R + R);               // overlong lead
  EXPECT_EQ(sanitize_utf8("x\xE2\x82"), "x" + R);            // truncated at the end
  EXPECT_EQ(sanitize_utf8("\xFF\x80" "b"), R + R + "b");
}

TEST(ServeEngine, TextStreamHoldsBackStopStringsAndSplitCharacters) {
  ServeFixture f("textstream", Reducer::none());
  const auto ids = f.tok->encode("row 1, column 4");
  TextStream plain(*f.tok, {});
  std::string streamed;
  for (auto id : ids) streamed += plain.push(id);
  streamed += plain.finish();
  EXPECT_EQ(streamed, f.tok->decode(ids));
  TextStream stop(*f.tok, {"column"});
  streamed.clear();
  for (auto id : ids) streamed += stop.push(id);
  streamed += stop.finish();
  EXPECT_TRUE(stop.stopped());
  EXPECT_EQ(streamed, "row 1, ");
}

TEST(ServeEngine, ContinuousBatchingEqualsGenerateAloneAndCachesImages) {
  ServeFixture f("engine", Reducer::parse("victor:m=2,k=2"));
  ServeOptions o;
  o.max_batch = 8;
  ServeEngine engine(*f.model, *f.tok, o);
  std::vector<Image> imgs = {lcg_image(28, 28, 10), lcg_image(40, 20, 11), lcg_image(28, 28, 12)};
  std::vector<std::string> questions = {"How many bags are there?", "Where is the dress?", "What is in row 2?"};
  std::vector<std::shared_ptr<Job>> jobs;
  for (int i = 0; i < 6; ++i) {  // images repeat: the last three hit the image cache
    ChatRequest r = parse_chat_request(request({user_message(questions[i % 3], {data_url(imgs[i % 3])})}, 6 + i).dump(), o.limits);
    r.temperature = i % 2 ? 0.8 : 0.0;
    r.seed = 100 + i;
    jobs.push_back(engine.make_job(r));
  }
  for (auto& j : jobs) ASSERT_TRUE(engine.submit(j));
  for (auto& j : jobs) {
    bool done = false;
    while (!done) j->take(std::chrono::milliseconds(100), &done);
  }
  size_t total = 0;
  for (auto& j : jobs) total += j->tokens.size();
  EXPECT_GT(total, 30u) << "too few tokens for the comparison to mean anything";
  for (int i = 0; i < 6; ++i) {
    auto ref = reference(f, questions[i % 3], {imgs[i % 3]}, 6 + i, i % 2 ? 0.8 : 0.0, 100 + i);
    EXPECT_EQ(jobs[i]->tokens, ref.tokens[0]) << i;
    EXPECT_EQ(jobs[i]->text, sanitize_utf8(ref.texts[0])) << i;
    EXPECT_TRUE(jobs[i]->finish_reason == "stop" || jobs[i]->finish_reason == "length") << jobs[i]->finish_reason;
  }
  auto c = engine.counters();
  EXPECT_GE(c.max_running_seen, 2) << "the requests never decoded together";
  EXPECT_EQ(c.vision_runs, 3u);
  EXPECT_EQ(c.image_cache_hits, 3u);
  EXPECT_EQ(c.requests_ok, 6u);
  EXPECT_TRUE(eventually([&] { return engine.counters().kv_bytes_in_use == 0 && engine.counters().kv_bytes_reserved == 0; }));
}

TEST(ServeEngine, LlavaNextRequestsEqualGenerateAndTheirCapStaysUnderTheServers) {
  // LLaVA-NeXT through the server: packed images batched with each other equal `generate`; a
  // request's max_crops picks fewer views (fewer prompt rows, its own image-cache entry); a cap
  // above the server's ceiling gets the ceiling.
  ServeFixture f("next", Reducer::parse("victor:m=2,k=2"), /*next=*/true);
  ServeOptions o;
  o.max_batch = 4;
  ServeEngine engine(*f.model, *f.tok, o);
  std::vector<Image> imgs = {lcg_image(56, 56, 20), lcg_image(50, 18, 21)};
  std::vector<std::shared_ptr<Job>> jobs;
  for (int i = 0; i < 3; ++i) {
    ChatRequest r = parse_chat_request(request({user_message("How many bags are there?", {data_url(imgs[i % 2])})}, 5).dump(), o.limits);
    jobs.push_back(engine.make_job(r));
  }
  ChatRequest capped = parse_chat_request(request({user_message("How many bags are there?", {data_url(imgs[0])})}, 5).dump(), o.limits);
  capped.max_crops = 1;  // no pinpoint of the tiny shape has one crop: the base view alone
  jobs.push_back(engine.make_job(capped));
  EXPECT_LT(jobs[3]->prompt_rows, jobs[0]->prompt_rows);
  EXPECT_EQ(jobs[3]->input.layouts[0].views(), 1);
  EXPECT_EQ(jobs[0]->input.layouts[0].views(), 5);
  for (auto& j : jobs) ASSERT_TRUE(engine.submit(j));
  for (auto& j : jobs) {
    bool done = false;
    while (!done) j->take(std::chrono::milliseconds(100), &done);
  }
  for (int i = 0; i < 3; ++i)
    EXPECT_EQ(jobs[i]->tokens, reference(f, "How many bags are there?", {imgs[i % 2]}, 5).tokens[0]) << i;
  Vlm base_only(*f.model);
  base_only.mutable_config().preprocess.max_crops = 1;
  SamplingOptions so;
  so.max_new_tokens = 5;
  EXPECT_EQ(jobs[3]->tokens, generate(base_only, *f.tok, {Request{"How many bags are there?", {imgs[0]}}}, so).tokens[0]);
  auto c = engine.counters();
  EXPECT_EQ(c.vision_runs, 3u);  // image 0 in full and capped, image 1; the third request hit the cache
  EXPECT_EQ(c.image_cache_hits, 1u);
  // The server's own ceiling bounds a request that asks for more.
  ServeEngine ceiling_engine(base_only, *f.tok, o);
  ChatRequest more = parse_chat_request(request({user_message("Is there a bag?", {data_url(imgs[0])})}, 2).dump(), o.limits);
  more.max_crops = 4;
  EXPECT_EQ(ceiling_engine.make_job(more)->input.layouts[0].views(), 1);
  // On a LLaVA-1.5 model the cap is refused by name.
  ServeFixture plain("next_plain", Reducer::none());
  ServeEngine e15(*plain.model, *plain.tok, o);
  ChatRequest bad = parse_chat_request(request({user_message("Is there a bag?", {data_url(imgs[0])})}, 2).dump(), o.limits);
  bad.max_image_tokens = 100;
  EXPECT_EQ(expect_api_error([&] { e15.make_job(bad); }, "max_image_tokens"), 400);
}

TEST(ServeEngine, ImageCacheEvictsTheLeastRecentlyUsed) {
  ServeFixture f("lru", Reducer::none());
  // Room for one encoded image (16 rows x 64 floats = 4 KiB): A, B, A runs the tower 3 times;
  // with room for both, twice.
  for (int64_t room : {int64_t(6000), int64_t(1) << 20}) {
    ServeOptions o;
    o.image_cache_bytes = room;
    ServeEngine engine(*f.model, *f.tok, o);
    const std::string a = data_url(lcg_image(28, 28, 61)), b = data_url(lcg_image(28, 28, 62));
    for (const auto& url : {a, b, a}) {
      auto job = engine.make_job(parse_chat_request(request({user_message("Is there a bag?", {url})}, 2).dump(), o.limits));
      ASSERT_TRUE(engine.submit(job));
      bool done = false;
      while (!done) job->take(std::chrono::milliseconds(100), &done);
    }
    auto c = engine.counters();
    EXPECT_EQ(c.vision_runs, room == 6000 ? 3u : 2u) << room;
    EXPECT_LE(c.image_cache_bytes, room);
    EXPECT_EQ(c.image_cache_bytes, room == 6000 ? 4096 : 8192);
  }
}

TEST(ServeEngine, KvBudgetAdmitsAsManyAsFitAndVictorAdmitsMore) {
  // With a budget for about three plain requests, the plain model never runs more than that at
  // once; Victor's smaller cache lets more run together under the same budget.
  std::map<std::string, int64_t> seen;
  for (const Reducer& r : {Reducer::none(), Reducer::parse("victor:m=2,k=1")}) {
    ServeFixture f("budget", r);
    ServeOptions o;
    const std::string url = data_url(lcg_image(28, 28, 3));
    ChatRequest cr = parse_chat_request(request({user_message("How many bags are there?", {url})}, 24).dump(), o.limits);
    const int64_t plain_need =
        kv_bytes_formula(without_reducer(f.model->config()), int64_t(encode_chat(*f.tok, cr.turns).ids.size()) - 1, 1, 24);
    o.kv_budget_bytes = plain_need * 3 + plain_need / 2;
    ServeEngine engine(*f.model, *f.tok, o);
    std::vector<std::shared_ptr<Job>> jobs;
    for (int i = 0; i < 10; ++i) jobs.push_back(engine.make_job(cr));
    for (auto& j : jobs) ASSERT_TRUE(engine.submit(j));
    for (auto& j : jobs) {
      bool done = false;
      while (!done) j->take(std::chrono::milliseconds(100), &done);
      EXPECT_EQ(j->tokens, jobs[0]->tokens);
    }
    seen[r.spec()] = engine.counters().max_running_seen;
    // Requests that ran their full length (no early end of sequence) overlap as long as they can.
    EXPECT_EQ(jobs[0]->tokens.size(), 24u);
  }
  EXPECT_LE(seen["none"], 3);
  EXPECT_GT(seen["victor:m=2,k=1"], seen["none"]);
}

// ---- The HTTP server end to end ----

struct LiveServer {
  ServeFixture f;
  std::unique_ptr<ServeEngine> engine;
  std::unique_ptr<Server> server;
  std::unique_ptr<httplib::Client> client;
  LiveServer(const std::string& name, ServeOptions o, const Reducer& r = Reducer::none()) : f(name, r) {
    o.model_name = "tiny";
    engine = std::make_unique<ServeEngine>(*f.model, *f.tok, o);
    server = std::make_unique<Server>(*engine, "127.0.0.1", 0);
    server->start();
    client = std::make_unique<httplib::Client>("127.0.0.1", server->port());
    client->set_read_timeout(60);
  }
  ~LiveServer() {
    engine->stop();
    server->stop();
  }
  httplib::Result post(const json& body) { return client->Post("/v1/chat/completions", body.dump(), "application/json"); }
};

TEST(ServeHttp, CompletionsMatchGenerateStreamingAndNot) {
  LiveServer s("http", ServeOptions{}, Reducer::parse("victor:m=2,k=2"));
  const Image img = lcg_image(28, 28, 21);
  const std::string q = "How many bags are there?";
  for (double temperature : {0.0, 0.9}) {
    auto ref = reference(s.f, q, {img}, 9, temperature, 5);
    json body = request({user_message(q, {data_url(img)})}, 9, temperature, 5);
    body["model"] = "tiny";
    auto res = s.post(body);
    ASSERT_TRUE(res) << "no response";
    ASSERT_EQ(res->status, 200) << res->body;
    json j = json::parse(res->body);
    EXPECT_EQ(j["object"], "chat.completion");
    EXPECT_EQ(j["choices"][0]["message"]["content"], sanitize_utf8(ref.texts[0]));
    EXPECT_EQ(j["usage"]["completion_tokens"], int64_t(ref.tokens[0].size()));
    // Prompt tokens: every row the LLM's first layer sees (text + 16 visual + 2 registers).
    EXPECT_EQ(j["usage"]["prompt_tokens"], ref.stats.prompt_tokens + ref.stats.visual_tokens + ref.stats.register_tokens);
    EXPECT_EQ(j["usage"]["total_tokens"], j["usage"]["prompt_tokens"].get<int64_t>() + int64_t(ref.tokens[0].size()));
    EXPECT_EQ(j["choices"][0]["finish_reason"], ref.tokens[0].size() == 9 ? "length" : "stop");
    EXPECT_EQ(j["victor"]["visual_tokens_in"], 16);
    EXPECT_EQ(j["victor"]["visual_tokens_to_llm"], 18);

    body["stream"] = true;
    body["stream_options"] = {{"include_usage", true}};
    auto sres = s.post(body);
    ASSERT_TRUE(sres);
    ASSERT_EQ(sres->status, 200);
    EXPECT_NE(sres->get_header_value("Content-Type").find("text/event-stream"), std::string::npos);
    EXPECT_NE(sres->body.find("data: [DONE]\n\n"), std::string::npos);
    auto events = sse_events(sres->body);
    std::string text;
    json finish, usage;
    for (auto& e : events) {
      EXPECT_EQ(e["object"], "chat.completion.chunk");
      if (e.contains("usage")) usage = e["usage"];
      if (e["choices"].empty()) continue;
      const auto& c = e["choices"][0];
      if (c["delta"].contains("content")) text += c["delta"]["content"].get<std::string>();
      if (!c["finish_reason"].is_null()) finish = c["finish_reason"];
    }
    EXPECT_EQ(events.front()["choices"][0]["delta"]["role"], "assistant");
    EXPECT_EQ(text, sanitize_utf8(ref.texts[0]));
    EXPECT_EQ(finish, j["choices"][0]["finish_reason"]);
    EXPECT_EQ(usage, j["usage"]);
  }
  auto models = s.client->Get("/v1/models");
  ASSERT_TRUE(models);
  EXPECT_EQ(json::parse(models->body)["data"][0]["id"], "tiny");
  auto health = s.client->Get("/health");
  ASSERT_TRUE(health);
  EXPECT_EQ(json::parse(health->body)["status"], "ok");
  auto page = s.client->Get("/");
  ASSERT_TRUE(page);
  EXPECT_NE(page->body.find("victor serve"), std::string::npos);
  auto metrics = s.client->Get("/metrics");
  ASSERT_TRUE(metrics);
  EXPECT_NE(metrics->body.find("victor_requests_total{outcome=\"ok\"} 4"), std::string::npos) << metrics->body;
  EXPECT_NE(metrics->body.find("victor_image_cache_hits_total 3"), std::string::npos);
  EXPECT_NE(metrics->body.find("victor_time_to_first_token_seconds_count 4"), std::string::npos);
}

TEST(ServeHttp, SecondTurnUsesTheImageCacheAndAnswersAsAFreshServer) {
  ServeOptions cached_opt, uncached_opt;
  uncached_opt.image_cache_bytes = 0;
  LiveServer s("turns", cached_opt), fresh("turns_fresh", uncached_opt);
  const std::string url = data_url(lcg_image(28, 28, 31));
  auto r1 = s.post(request({user_message("How many bags are there?", {url})}, 5));
  ASSERT_TRUE(r1);
  ASSERT_EQ(r1->status, 200) << r1->body;
  const std::string answer = json::parse(r1->body)["choices"][0]["message"]["content"];
  json turn2 = request({user_message("How many bags are there?", {url}),
                        {{"role", "assistant"}, {"content", answer}},
                        {{"role", "user"}, {"content", "Where is the dress?"}}},
                       6);
  EXPECT_EQ(s.engine->counters().vision_runs, 1u);
  auto r2 = s.post(turn2);
  ASSERT_TRUE(r2);
  ASSERT_EQ(r2->status, 200);
  EXPECT_EQ(s.engine->counters().vision_runs, 1u) << "the second turn ran the vision tower again";
  EXPECT_EQ(s.engine->counters().image_cache_hits, 1u);
  EXPECT_TRUE(json::parse(r2->body)["victor"]["image_cache_hit"].get<bool>());
  auto r3 = fresh.post(turn2);
  ASSERT_TRUE(r3);
  EXPECT_EQ(json::parse(r2->body)["choices"][0]["message"]["content"], json::parse(r3->body)["choices"][0]["message"]["content"]);
  EXPECT_EQ(fresh.engine->counters().vision_runs, 1u);
}

TEST(ServeHttp, EveryLimitAnswersItsStatusAndTheServerStaysUp) {
  ServeOptions o;
  o.limits.max_body_bytes = 64 * 1024;
  o.limits.max_image_pixels = 50 * 50;
  o.limits.max_images = 2;
  LiveServer s("limits", o);
  auto status_of = [&](const std::string& body) {
    auto r = s.client->Post("/v1/chat/completions", body, "application/json");
    if (!r) return 0;
    if (r->status >= 400) {
      json j = json::parse(r->body);  // every refusal is OpenAI's error shape
      EXPECT_TRUE(j["error"]["message"].is_string()) << r->body;
    }
    return r->status;
  };
  const std::string url = data_url(lcg_image(28, 28, 1));
  EXPECT_EQ(status_of("{\"messages\": ["), 400);
  EXPECT_EQ(status_of(request({user_message("x", {"data:image/png;base64,!!"})}, 4).dump()), 400);
  EXPECT_EQ(status_of(request({user_message("x", {"data:image/png;base64," + base64_encode("not an image at all")})}, 4).dump()), 400);
  EXPECT_EQ(status_of(request({user_message("x", {"/etc/hostname"})}, 4).dump()), 400);
  EXPECT_EQ(status_of(request({user_message("x", {url, url, url})}, 4).dump()), 400);
  EXPECT_EQ(status_of(request({user_message("x", {data_url(lcg_image(60, 60, 2))})}, 4).dump()), 413);  // pixels
  EXPECT_EQ(status_of(std::string(70 * 1024, ' ')), 413);                                               // body
  json unknown = request({user_message("x", {})}, 4);
  unknown["model"] = "gpt-4o";
  EXPECT_EQ(status_of(unknown.dump()), 404);
  EXPECT_EQ(status_of(request({user_message("x", {url})}, 1010).dump()), 400);  // prompt + max_tokens > 1024
  auto none = s.client->Get("/v2/nothing");
  ASSERT_TRUE(none);
  EXPECT_EQ(none->status, 404);
  EXPECT_EQ(status_of(request({user_message("How many bags are there?", {url})}, 3).dump()), 200);  // still up
}

TEST(ServeHttp, FullQueueAnswers503WithRetryAfterAndTimeoutsAnswer504) {
  ServeOptions full;
  full.limits.max_queue = 0;
  LiveServer s("queue", full);
  auto r = s.post(request({user_message("x", {})}, 3));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 503);
  EXPECT_EQ(r->get_header_value("Retry-After"), "1");
  EXPECT_EQ(s.engine->counters().rejected_queue_full, 1u);

  ServeOptions quick;
  quick.limits.request_timeout_seconds = 1e-6;
  LiveServer t("timeout", quick);
  auto r2 = t.post(request({user_message("x", {})}, 3));
  ASSERT_TRUE(r2);
  EXPECT_EQ(r2->status, 504) << r2->body;
  EXPECT_EQ(t.engine->counters().requests_timeout, 1u);

  // A request that times out while decoding leaves the batch and frees its cache. The timeout is
  // set from this machine's own speed (measured on an untimed server first): well past the first
  // token, well before the 1000th, whatever the build or the load.
  json long_one = request({user_message("How many bags are there?", {})}, 1000);
  long_one["ignore_eos"] = true;
  double ttft = 0, decode_seconds = 0;
  {
    LiveServer m("timeout_measure", ServeOptions{});
    auto r = m.post(long_one);
    ASSERT_TRUE(r);
    ASSERT_EQ(r->status, 200) << r->body;
    auto j = json::parse(r->body)["victor"];
    ttft = j["time_to_first_token_seconds"].get<double>();
    decode_seconds = 1000 / j["decode_tokens_per_second"].get<double>();
  }
  ServeOptions running;
  running.limits.request_timeout_seconds = std::max(4 * ttft, ttft + decode_seconds / 3);
  LiveServer u("timeout_running", running);
  auto r3 = u.post(long_one);
  ASSERT_TRUE(r3);
  EXPECT_EQ(r3->status, 504) << r3->body;
  auto c = u.engine->counters();
  EXPECT_EQ(c.requests_timeout, 1u);
  EXPECT_GT(c.decode_steps, 0u) << "it should have timed out while decoding, not in the queue";
  EXPECT_TRUE(eventually([&] { return u.engine->counters().kv_bytes_reserved == 0 && u.engine->counters().running == 0; }));
}

TEST(ServeHttp, ClientThatDisconnectsMidStreamFreesItsCache) {
  ServeOptions o;
  LiveServer s("disconnect", o);
  json body = request({user_message("How many bags are there?", {data_url(lcg_image(28, 28, 41))})}, 900);
  body["stream"] = true;
  const std::string payload = body.dump();
  const int fd = connect_local(s.server->port());
  ASSERT_GE(fd, 0);
  std::string req = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
                    std::to_string(payload.size()) + "\r\n\r\n" + payload;
  ASSERT_EQ(::send(fd, req.data(), req.size(), 0), ssize_t(req.size()));
  // Read until some content has streamed, then hang up.
  std::string got;
  char buf[4096];
  auto chunks = [&] {
    size_t n = 0;
    for (size_t p = got.find("chat.completion.chunk"); p != std::string::npos; p = got.find("chat.completion.chunk", p + 1)) ++n;
    return n;
  };
  while (chunks() < 3) {
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    ASSERT_GT(n, 0) << got;
    got.append(buf, size_t(n));
  }
  EXPECT_GT(s.engine->counters().kv_bytes_reserved, 0);
  ::close(fd);
  EXPECT_TRUE(eventually([&] {
    auto c = s.engine->counters();
    return c.requests_cancelled == 1 && c.running == 0 && c.kv_bytes_in_use == 0 && c.kv_bytes_reserved == 0;
  })) << s.engine->metrics_text();
  EXPECT_LT(s.engine->counters().completion_tokens, 900u);
}

TEST(ServeHttp, ApiKeyAndCors) {
  ServeOptions o;
  o.api_key = "sekrit";
  o.cors_origin = "*";
  LiveServer s("apikey", o);
  auto body = request({user_message("x", {})}, 2).dump();
  auto none = s.client->Post("/v1/chat/completions", body, "application/json");
  ASSERT_TRUE(none);
  EXPECT_EQ(none->status, 401);
  EXPECT_EQ(json::parse(none->body)["error"]["type"], "invalid_request_error");
  EXPECT_EQ(s.client->Get("/v1/models", {{"Authorization", "Bearer wrong"}})->status, 401);
  auto ok = s.client->Post("/v1/chat/completions", {{"Authorization", "Bearer sekrit"}}, body, "application/json");
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->status, 200) << ok->body;
  EXPECT_EQ(ok->get_header_value("Access-Control-Allow-Origin"), "*");
  EXPECT_EQ(s.client->Get("/health")->status, 200);  // outside /v1: no key (load balancers)
  auto pre = s.client->Options("/v1/chat/completions");
  ASSERT_TRUE(pre);
  EXPECT_EQ(pre->status, 204);
  EXPECT_NE(pre->get_header_value("Access-Control-Allow-Headers").find("Authorization"), std::string::npos);
}

// ---- The gate in front of the HTTP library: slow, malformed and abusive clients ----

namespace {
// Reads until the server closes or `seconds` pass.
std::string read_reply(int fd, double seconds) {
  std::string out;
  const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(int64_t(seconds * 1000));
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now()).count();
    if (left <= 0) break;
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, int(left)) <= 0) break;
    char buf[4096];
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    out.append(buf, size_t(n));
  }
  return out;
}

// One request on a fresh connection; the reply and how long it took.
std::pair<std::string, double> gate_exchange(int port, const std::string& request, double seconds = 5) {
  const auto t0 = std::chrono::steady_clock::now();
  const int fd = connect_local(port);
  EXPECT_GE(fd, 0);
  size_t sent = 0;
  while (sent < request.size()) {
    const ssize_t n = ::send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) break;  // the gate may refuse (and close) before the whole request is sent
    sent += size_t(n);
  }
  std::string r = read_reply(fd, seconds);
  ::close(fd);
  return {r, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()};
}

int status_of(const std::string& reply) {
  return reply.rfind("HTTP/1.1 ", 0) == 0 && reply.size() >= 12 ? std::atoi(reply.substr(9, 3).c_str()) : 0;
}
}  // namespace

TEST(ServeGate, SlowAndMalformedClientsHoldNoWorkerAndAreAnsweredAtOnce) {
  ServeOptions o;
  o.gate.header_timeout_seconds = 2;
  o.limits.max_body_bytes = 1 << 20;
  LiveServer s("gate", o);
  const int port = s.server->port();
  // 200 clients that sent half a request line and then nothing (each would hold a worker of the
  // HTTP library, 108 by default, for its 60 s read timeout).
  std::vector<int> slow;
  for (int i = 0; i < 200; ++i) {
    const int fd = connect_local(port);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::send(fd, "GET /hea", 8, MSG_NOSIGNAL), 8);
    slow.push_back(fd);
  }
  auto [health, took] = gate_exchange(port, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(status_of(health), 200) << health;
  EXPECT_LT(took, 1.0);
  // Content-Length that is not a byte count: 400 at once (it waited 60 s for a thread's read).
  for (const char* cl : {"-1", "18446744073709551616", "12abc", "1, 2"}) {
    auto [r, t] = gate_exchange(port, std::string("POST /v1/chat/completions HTTP/1.1\r\nContent-Length: ") + cl + "\r\n\r\n");
    EXPECT_EQ(status_of(r), 400) << cl << ": " << r;
    EXPECT_LT(t, 1.0) << cl;
  }
  // Over the body limit: 413 before a byte of the body, by Content-Length or by a chunk header.
  auto [big, t_big] = gate_exchange(port, "POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n");
  EXPECT_EQ(status_of(big), 413) << big;
  EXPECT_LT(t_big, 1.0);
  auto [chunked, t_chunked] =
      gate_exchange(port, "POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n200000\r\nabc");
  EXPECT_EQ(status_of(chunked), 413) << chunked;
  EXPECT_LT(t_chunked, 1.0);
  // Too many header lines, or too many header bytes: 431.
  std::string many = "GET /health HTTP/1.1\r\n";
  for (int i = 0; i < 150; ++i) many += "X-A: b\r\n";
  EXPECT_EQ(status_of(gate_exchange(port, many + "\r\n").first), 431);
  std::string huge = "GET /health HTTP/1.1\r\nX-Big: " + std::string(100000, 'a') + "\r\n\r\n";
  EXPECT_EQ(status_of(gate_exchange(port, huge).first), 431);
  // Pipelined requests: the first is answered, then the connection closes (never a stale reply).
  auto [two, t_two] = gate_exchange(port, "GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(status_of(two), 200);
  EXPECT_EQ(two.find("HTTP/1.1", 5), std::string::npos) << two;
  EXPECT_LT(t_two, 2.0);  // closed, not held open
  // The slow clients get 408 once their head deadline passes, and /metrics counts them.
  const std::string late = read_reply(slow[0], 4.0);
  EXPECT_EQ(status_of(late), 408) << late;
  for (int fd : slow) ::close(fd);
  auto [metrics, t_m] = gate_exchange(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_NE(metrics.find("victor_http_refused_total{reason=\"header_timeout\"} "), std::string::npos);
  EXPECT_NE(metrics.find("victor_http_refused_total{reason=\"body_too_large\"} 2"), std::string::npos) << metrics;
  // A real request still goes through the gate.
  auto res = s.post({{"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"max_tokens", 2}});
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 200) << res->body;
}

TEST(ServeGate, ConnectionCapsAnswer503WithRetryAfter) {
  ServeOptions o;
  o.gate.max_connections_per_peer = 4;
  LiveServer s("gatecap", o);
  const int port = s.server->port();
  std::vector<int> held;
  for (int i = 0; i < 4; ++i) held.push_back(connect_local(port));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the gate has accepted them
  auto [r, t] = gate_exchange(port, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(status_of(r), 503) << r;
  EXPECT_NE(r.find("Retry-After: 1"), std::string::npos);
  for (int fd : held) ::close(fd);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_EQ(status_of(gate_exchange(port, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").first), 200);
}

TEST(ServeGate, ANonStreamingClientThatLeavesCancelsItsRequest) {
  ServeOptions o;
  LiveServer s("gone", o);
  json body = request({user_message("How many bags are there?", {data_url(lcg_image(28, 28, 43))})}, 900);
  body["ignore_eos"] = true;
  const std::string payload = body.dump();
  const int fd = connect_local(s.server->port());
  ASSERT_GE(fd, 0);
  const std::string req = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " +
                          std::to_string(payload.size()) + "\r\n\r\n" + payload;
  ASSERT_EQ(::send(fd, req.data(), req.size(), MSG_NOSIGNAL), ssize_t(req.size()));
  ASSERT_TRUE(eventually([&] { return s.engine->counters().running == 1; }));
  ::close(fd);  // no byte of the answer read: the handler only waits, it never writes
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(eventually([&] {
    auto c = s.engine->counters();
    return c.requests_cancelled == 1 && c.running == 0 && c.kv_bytes_reserved == 0;
  })) << s.engine->metrics_text();
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 1.5);
  EXPECT_LT(s.engine->counters().completion_tokens, 900u);
}

TEST(ServeEngine, ImagesInFlightStayWithinTheirMemoryBudget) {
  // Eight requests with a 300 x 300 image each decode at once; the budget holds two images'
  // worth: the bytes held never exceed it, and an image that alone needs more is a 413.
  ServeFixture f("imgbudget", Reducer::none());
  ServeOptions o;
  int64_t one = 0;
  {
    ServeOptions probe;
    probe.image_memory_bytes = 1;
    ServeEngine e(*f.model, *f.tok, probe);
    ChatRequest r = parse_chat_request(
        json{{"messages", {user_message("hi", {data_url(lcg_image(300, 300, 1))})}}}.dump(), probe.limits);
    int status = 0;
    std::string msg;
    try {
      e.make_job(r);
    } catch (const ApiError& err) {
      status = err.status;
      msg = err.what();
    }
    EXPECT_EQ(status, 413);
    ASSERT_NE(msg.find("--image-memory-mb"), std::string::npos) << msg;
    one = (std::stoll(msg.substr(msg.find("needs ") + 6)) + 1) << 20;  // MiB, rounded up
    e.stop();
  }
  o.image_memory_bytes = std::max<int64_t>(2 * one + (2 << 20), 4 << 20);
  ServeEngine engine(*f.model, *f.tok, o);
  std::vector<std::thread> ts;
  std::atomic<int> ok{0};
  for (int i = 0; i < 8; ++i)
    ts.emplace_back([&, i] {
      ChatRequest r = parse_chat_request(
          json{{"messages", {user_message("hi", {data_url(lcg_image(300, 300, uint32_t(i + 2)))})}}}.dump(), o.limits);
      if (engine.make_job(r)) ++ok;
    });
  for (auto& t : ts) t.join();
  const auto m = engine.memory();
  EXPECT_EQ(ok.load(), 8);
  EXPECT_GT(m.images_peak, 0);
  EXPECT_LE(m.images_peak, o.image_memory_bytes);
  EXPECT_EQ(m.by_kind[MemoryBudget::kDecoding], 0);
  EXPECT_EQ(m.by_kind[MemoryBudget::kPixels], 0);      // the jobs were dropped: their pixels went back
  EXPECT_GT(m.peak_by_kind[MemoryBudget::kPixels], 0);  // while they lived they held them
  engine.stop();
}

TEST(ServeEngine, MemoryBudgetAdmitsByTheSumOfKvAndActivations) {
  // The budget leaves room for one request's KV and activations and half of another's KV: the
  // requests run one at a time, each answers as alone, and every byte goes back at the end.
  ServeFixture f("membudget", Reducer::none());
  const std::string url = data_url(lcg_image(28, 28, 5));
  ServeOptions o;
  ChatRequest cr = parse_chat_request(request({user_message("How many bags are there?", {url})}, 12).dump(), o.limits);
  int64_t held = 0, need = 0;
  {
    ServeEngine probe(*f.model, *f.tok, o);
    auto j = probe.make_job(cr);
    EXPECT_GT(j->prefill_activations, 0);
    EXPECT_GT(j->decode_activations, 0);
    held = j->kv_reserved + j->decode_activations;  // while it runs
    need = held + j->prefill_activations;           // to be admitted
    probe.stop();
  }
  o.memory_budget_bytes = o.image_cache_bytes + o.image_memory_bytes + need + held / 2;
  ServeEngine engine(*f.model, *f.tok, o);
  std::vector<std::shared_ptr<Job>> jobs;
  for (int i = 0; i < 4; ++i) jobs.push_back(engine.make_job(cr));
  for (auto& j : jobs) ASSERT_TRUE(engine.submit(j));
  for (auto& j : jobs) {
    bool done = false;
    while (!done) j->take(std::chrono::milliseconds(100), &done);
    EXPECT_EQ(j->finish_reason, jobs[0]->finish_reason);
    EXPECT_EQ(j->tokens, jobs[0]->tokens);
  }
  EXPECT_EQ(engine.counters().max_running_seen, 1);
  const MemoryBudget::Snapshot m = engine.memory();
  EXPECT_LE(m.peak, o.memory_budget_bytes - o.image_cache_bytes);
  EXPECT_GE(m.peak, need);
  EXPECT_EQ(m.reserved, 0);
  for (int k = 0; k < MemoryBudget::kKinds; ++k) EXPECT_EQ(m.by_kind[k], 0) << MemoryBudget::kind_name(MemoryBudget::Kind(k));
  jobs.clear();
  // A request that alone cannot fit what the budget leaves one request: 400 naming the option.
  o.memory_budget_bytes = o.image_cache_bytes + o.image_memory_bytes + need - 1;
  ServeEngine small(*f.model, *f.tok, o);
  int status = 0;
  std::string msg;
  try {
    small.make_job(cr);
  } catch (const ApiError& e) {
    status = e.status;
    msg = e.what();
  }
  EXPECT_EQ(status, 400);
  EXPECT_NE(msg.find("--memory-budget-mb"), std::string::npos) << msg;
  EXPECT_EQ(small.memory().reserved, 0);  // its pixels went back with it
  // /metrics shows the budget by kind.
  const std::string text = engine.metrics_text();
  EXPECT_NE(text.find("victor_memory_bytes_reserved{kind=\"kv\"} 0"), std::string::npos);
  EXPECT_NE(text.find("victor_memory_budget_bytes " + std::to_string(o.image_cache_bytes + o.image_memory_bytes + need + held / 2)),
            std::string::npos);
}

#if !defined(__SANITIZE_ADDRESS__)
namespace {
int64_t rss_bytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmRSS:", 0) == 0) return int64_t(std::stoll(line.substr(6))) * 1024;
  return 0;
}
}  // namespace

TEST(ServeEngine, PrefillActivationFormulaBoundsTheMeasuredPeak) {
  // The bytes a prefill holds besides the weights and its cache, measured as the rise of the
  // process's peak resident memory (VmHWM, reset before), stay under prefill_activation_bytes,
  // which is not loose by more than 3x. A model whose activations dwarf the allocator's noise:
  // 2,000+ rows, 8 heads (scores in query blocks), with and without an image.
  ModelConfig c = tiny_config();
  c.text.hidden_size = 256;
  c.text.num_attention_heads = 8;
  c.text.num_key_value_heads = 8;
  c.text.intermediate_size = 688;
  c.text.num_hidden_layers = 2;
  c.text.max_position_embeddings = 4096;
  Vlm model = Vlm::random(c, 7);
  auto rss = rss_bytes;
  torch::NoGradGuard ng;
  for (int images : {0, 1}) {
    std::vector<int64_t> text(2400);
    for (size_t i = 0; i < text.size(); ++i) text[i] = 2 + int64_t(i * 7 % 50);
    PromptInput in = prompt(c, text, {3, 4}, images ? random_pixels(1, c.vision.image_size, 3) : torch::Tensor());
    auto run = [&] {
      std::vector<torch::Tensor> embeds;
      if (images) embeds.push_back(model.encode_image(in.pixels, ImageLayout{}));
      auto [cache, logits] = model.prefill(model.assemble({in}, embeds, true), torch::kFloat32, 1);
      return cache.bytes();
    };
    run();  // warm: thread pools, BLAS buffers, rope tables
#ifdef __GLIBC__
    malloc_trim(0);
#endif
    const int64_t before = rss();
    reset_peak_rss();
    const int64_t kv = run();
    const int64_t used = peak_rss_bytes() - before - kv;
    const int64_t text_rows = int64_t(in.ids.size()) - images;
    const std::vector<int64_t> visual(size_t(images), c.visual_tokens_per_image());
    const int64_t bound = prefill_activation_bytes(c, text_rows, visual, images);
    std::printf("[ measured ] %d image(s), %lld rows: prefill held %.1f MiB besides its KV; the bound says %.1f MiB\n",
                images, (long long)(text_rows + images * c.visual_tokens_per_image()), used / 1048576.0, bound / 1048576.0);
    EXPECT_GT(used, 0);
    EXPECT_LE(used, bound) << images << " image(s): measured " << used / 1048576.0 << " MiB";
    EXPECT_LE(bound, 3 * used) << images << " image(s): formula " << bound / 1048576.0 << " MiB, measured "
                               << used / 1048576.0 << " MiB";
  }
}
#endif
