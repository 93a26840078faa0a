// The chat-completions request as `victor serve` reads it: limits, OpenAI-shaped errors, the
// parser, base64 and UTF-8 repair. No torch here: the fuzz targets (tests/fuzz) build it alone.
#pragma once
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "victor/tokenizer.h"

namespace victor {

// ---- Limits (every one configurable from the command line and tested) ----
struct ServeLimits {
  int64_t max_body_bytes = 64ll << 20;     // request body
  int64_t max_image_bytes = 20ll << 20;    // one encoded image (after base64 decoding)
  int64_t max_image_pixels = 4096ll * 4096;  // width * height of one image
  int max_images = 8;                      // images per request
  int max_tokens = 4096;                   // the largest max_tokens a request may ask for
  int default_max_tokens = 256;            // when the request names none (capped by the context)
  int max_queue = 64;                      // requests waiting for admission (503 beyond)
  double request_timeout_seconds = 600;    // queue + prefill + decode
  std::string allow_files;                 // local image paths allowed inside this folder ("" = none)
};

// An OpenAI-shaped API error: HTTP status, error type, the offending field ("param").
struct ApiError : std::runtime_error {
  ApiError(int status, std::string type, std::string param, const std::string& message)
      : std::runtime_error(message), status(status), type(std::move(type)), param(std::move(param)) {}
  int status;
  std::string type, param;
};
// {"error": {"message", "type", "param", "code"}}
std::string error_body(const ApiError& e);
// Logs an internal failure's full text to stderr under a new id ("err-N") and returns the clean
// message a client may see: no exception text, stack or address leaves the server.
std::string internal_error(const std::string& stage, const std::exception& e);

struct ChatImage {
  std::string url;    // as sent (a data: URL is not kept: `bytes` holds its content)
  std::string field;  // where it was: "messages[0].content[1].image_url.url"
  std::string bytes;  // the encoded image (PNG/JPEG/BMP)
};

struct ChatRequest {
  std::string model;
  std::vector<Turn> turns;  // LLaVA turns; the last one's assistant text is empty (to generate)
  std::vector<ChatImage> images;  // in prompt order, one per "<image>" in the turns
  std::optional<int> max_tokens;
  double temperature = 1.0;  // OpenAI's default
  double top_p = 1.0;
  int top_k = 0;             // extension (llama.cpp's server has it too)
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool ignore_eos = false;     // extension (vLLM, llama.cpp): run to max_tokens (benchmarks)
  // Extensions, LLaVA-NeXT: this request's cap on the image-token bill (0 = the server's own;
  // never above the server's --max-crops / --max-image-tokens).
  int max_crops = 0, max_image_tokens = 0;
};

// Parses and validates a chat-completions body. Images are decoded from data: URLs (base64) or
// read from local paths inside limits.allow_files; nothing else is fetched. Throws ApiError.
ChatRequest parse_chat_request(const std::string& body, const ServeLimits& limits);
// Strict base64 (standard alphabet, padding optional, whitespace ignored); throws ApiError(400).
std::string base64_decode(const std::string& in, const std::string& field);
std::string base64_encode(const std::string& in);

// Valid UTF-8: each maximal invalid subpart replaced by U+FFFD, as the WHATWG decoder (browsers,
// Node) does. A model can emit any bytes (byte-fallback tokens); JSON and clients need UTF-8.
std::string sanitize_utf8(const std::string& s);

}  // namespace victor
