// The chat-completions request parser, base64 and UTF-8 repair (no torch: fuzzed alone).
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "victor/error.h"
#include "victor/files.h"
#include "victor/serve/api.h"

namespace victor {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

ApiError bad(const std::string& param, const std::string& message) {
  return ApiError(400, "invalid_request_error", param, param.empty() ? message : param + ": " + message);
}

int b64_value(unsigned char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+' || c == '-') return 62;  // '-' and '_': the URL-safe alphabet
  if (c == '/' || c == '_') return 63;
  return -1;
}

double number(const json& j, const std::string& field, double lo, double hi) {
  if (!j.is_number()) throw bad(field, "must be a number");
  double v = j.get<double>();
  if (!std::isfinite(v) || v < lo || v > hi)
    throw bad(field, "must be a number in [" + json(lo).dump() + ", " + json(hi).dump() + "]");
  return v;
}

int64_t integer(const json& j, const std::string& field, int64_t lo, int64_t hi) {
  if (!j.is_number_integer() && !j.is_number_unsigned()) throw bad(field, "must be an integer");
  if (j.is_number_unsigned() && j.get<uint64_t>() > uint64_t(INT64_MAX))
    throw bad(field, "must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  int64_t v = j.get<int64_t>();
  if (v < lo || v > hi)
    throw bad(field, "must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return v;
}

// The bytes an image_url names: a data: URL, or a local path inside allow_files.
std::string image_bytes(const std::string& url, const std::string& field, const ServeLimits& lim) {
  if (url.rfind("data:", 0) == 0) {
    const size_t comma = url.find(',');
    if (comma == std::string::npos) throw bad(field, "data URL has no ',' before its content");
    const std::string meta = url.substr(5, comma - 5);
    if (meta.size() < 7 || meta.compare(meta.size() - 7, 7, ";base64") != 0)
      throw bad(field, "data URL must be base64 (data:image/png;base64,...)");
    // Base64 holds 3 bytes per 4 characters: refuse before decoding what would exceed the limit.
    if (int64_t(url.size() - comma - 1) / 4 * 3 > lim.max_image_bytes + 3)
      throw ApiError(413, "invalid_request_error", field,
                     field + ": image larger than the limit of " + std::to_string(lim.max_image_bytes) + " bytes");
    return base64_decode(url.substr(comma + 1), field);
  }
  if (url.rfind("http://", 0) == 0 || url.rfind("https://", 0) == 0)
    throw bad(field, "remote image URLs are not fetched by this server; send the image as a data: URL "
                     "(data:image/png;base64,...)");
  if (lim.allow_files.empty())
    throw bad(field, "local image paths are refused (start the server with --allow-files DIR); send "
                     "a data: URL");
  std::string path = url.rfind("file://", 0) == 0 ? url.substr(7) : url;
  std::error_code ec;
  const fs::path root = fs::canonical(lim.allow_files, ec);
  if (ec) throw ApiError(500, "server_error", "", "--allow-files folder is not readable: " + lim.allow_files);
  const fs::path p = fs::weakly_canonical(fs::path(path).is_absolute() ? fs::path(path) : root / path, ec);
  auto rel = p.lexically_relative(root);
  // Outside means a first component that IS "..": a file named "..dots.png" is inside.
  if (ec || rel.empty() || *rel.begin() == "..")
    throw ApiError(403, "invalid_request_error", field, field + ": path is outside the allowed folder");
  if (!fs::is_regular_file(p, ec)) throw bad(field, "no such image file: " + path);
  if (int64_t(fs::file_size(p, ec)) > lim.max_image_bytes)
    throw ApiError(413, "invalid_request_error", field,
                   field + ": image larger than the limit of " + std::to_string(lim.max_image_bytes) + " bytes");
  return read_file(p.string(), FileKind::Image);
}

// One message's content: a string, or an array of text / image_url parts. Images become
// "<image>\n" at their place in the text.
std::string content_text(const json& content, const std::string& field, bool images_allowed,
                         std::vector<ChatImage>& images, const ServeLimits& lim) {
  if (content.is_string()) return content.get<std::string>();
  if (content.is_null()) return "";
  if (!content.is_array()) throw bad(field, "must be a string or an array of content parts");
  std::string text;
  for (size_t i = 0; i < content.size(); ++i) {
    const auto& part = content[i];
    const std::string pf = field + "[" + std::to_string(i) + "]";
    if (!part.is_object() || !part.contains("type") || !part["type"].is_string())
      throw bad(pf, "must be an object with a string 'type'");
    const std::string type = part["type"].get<std::string>();
    if (type == "text") {
      if (!part.contains("text") || !part["text"].is_string()) throw bad(pf + ".text", "must be a string");
      if (!text.empty() && text.back() != '\n') text += "\n";
      text += part["text"].get<std::string>();
    } else if (type == "image_url") {
      if (!images_allowed) throw bad(pf, "images are accepted in user messages only");
      if (!part.contains("image_url")) throw bad(pf + ".image_url", "is missing");
      const auto& iu = part["image_url"];
      std::string uf = pf + ".image_url";
      std::string url;
      if (iu.is_string()) {
        url = iu.get<std::string>();
      } else if (iu.is_object() && iu.contains("url") && iu["url"].is_string()) {
        url = iu["url"].get<std::string>();
        uf += ".url";
      } else {
        throw bad(uf, "must be an object with a string 'url'");
      }
      if (int(images.size()) >= lim.max_images)
        throw bad(pf, "more than " + std::to_string(lim.max_images) + " images in one request");
      ChatImage img;
      img.field = uf;
      img.url = url.rfind("data:", 0) == 0 ? url.substr(0, std::min<size_t>(url.find(','), 40)) : url;
      img.bytes = image_bytes(url, uf, lim);
      if (int64_t(img.bytes.size()) > lim.max_image_bytes)
        throw ApiError(413, "invalid_request_error", uf,
                       uf + ": image larger than the limit of " + std::to_string(lim.max_image_bytes) + " bytes");
      images.push_back(std::move(img));
      if (!text.empty() && text.back() != '\n') text += "\n";
      text += "<image>\n";
    } else {
      throw bad(pf + ".type", "unknown content part type '" + type + "' (expected text or image_url)");
    }
  }
  return text;
}

}  // namespace

std::string error_body(const ApiError& e) {
  json j = {{"error",
             {{"message", e.what()},
              {"type", e.type},
              {"param", e.param.empty() ? json(nullptr) : json(e.param)},
              {"code", json(nullptr)}}}};
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string base64_decode(const std::string& in, const std::string& field) {
  std::string out;
  out.reserve(in.size() / 4 * 3);
  uint32_t acc = 0;
  int bits = 0, pad = 0;
  for (unsigned char c : in) {
    if (c == ' ' || c == '\n' || c == '\r' || c == '\t') continue;
    if (c == '=') {
      ++pad;
      continue;
    }
    const int v = b64_value(c);
    if (v < 0 || pad > 0) throw bad(field, "invalid base64 in data URL");
    acc = (acc << 6) | uint32_t(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(char((acc >> bits) & 0xFF));
    }
  }
  if (pad > 2 || bits >= 6) throw bad(field, "invalid base64 in data URL (truncated)");
  return out;
}

std::string base64_encode(const std::string& in) {
  static const char* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < in.size(); i += 3) {
    uint32_t v = (uint8_t(in[i]) << 16) | (uint8_t(in[i + 1]) << 8) | uint8_t(in[i + 2]);
    for (int s = 18; s >= 0; s -= 6) out.push_back(alphabet[(v >> s) & 63]);
  }
  if (i < in.size()) {
    uint32_t v = uint8_t(in[i]) << 16;
    if (i + 1 < in.size()) v |= uint8_t(in[i + 1]) << 8;
    out.push_back(alphabet[(v >> 18) & 63]);
    out.push_back(alphabet[(v >> 12) & 63]);
    out.push_back(i + 1 < in.size() ? alphabet[(v >> 6) & 63] : '=');
    out.push_back('=');
  }
  return out;
}

ChatRequest parse_chat_request(const std::string& body, const ServeLimits& lim) {
  json j;
  try {
    j = json::parse(body);
  } catch (const json::exception& e) {
    throw bad("", std::string("request body is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw bad("", "request body must be a JSON object");
  ChatRequest r;
  if (j.contains("model") && !j["model"].is_null()) {
    if (!j["model"].is_string()) throw bad("model", "must be a string");
    r.model = j["model"].get<std::string>();
  }
  if (!j.contains("messages")) throw bad("messages", "is required");
  const auto& msgs = j["messages"];
  if (!msgs.is_array() || msgs.empty()) throw bad("messages", "must be a non-empty array");
  std::string system, user;
  bool have_user = false;
  for (size_t i = 0; i < msgs.size(); ++i) {
    const std::string f = "messages[" + std::to_string(i) + "]";
    const auto& m = msgs[i];
    if (!m.is_object()) throw bad(f, "must be an object");
    if (!m.contains("role") || !m["role"].is_string()) throw bad(f + ".role", "must be a string");
    const std::string role = m["role"].get<std::string>();
    if (!m.contains("content")) throw bad(f + ".content", "is required");
    const bool is_user = role == "user";
    std::string text = content_text(m["content"], f + ".content", is_user, r.images, lim);
    if (text.find("<image>") != std::string::npos && !is_user)
      throw bad(f + ".content", "may not contain '<image>'");
    if (role == "system" || role == "developer") {
      if (!system.empty()) system += "\n";
      system += text;
    } else if (is_user) {
      if (have_user && !user.empty()) user += "\n";
      user += text;
      have_user = true;
    } else if (role == "assistant") {
      if (!have_user) throw bad(f, "an assistant message must follow a user message");
      r.turns.push_back({user, text});
      user.clear();
      have_user = false;
    } else {
      throw bad(f + ".role", "unknown role '" + role + "' (expected system, user or assistant)");
    }
  }
  if (!have_user) throw bad("messages", "the last message must be from the user");
  r.turns.push_back({user, ""});
  // LLaVA-1.5's template has no system slot: a system message leads the first user turn.
  if (!system.empty()) r.turns.front().human = system + "\n" + r.turns.front().human;
  size_t placeholders = 0;
  for (auto& t : r.turns)
    for (size_t p = t.human.find("<image>"); p != std::string::npos; p = t.human.find("<image>", p + 1))
      ++placeholders;
  if (placeholders != r.images.size())
    throw bad("messages", "text may not contain '<image>' (images are sent as image_url parts)");
  bool any_text = false;
  for (auto& t : r.turns) any_text = any_text || t.human.find_first_not_of(" \t\r\n") != std::string::npos;
  if (!any_text) throw bad("messages", "no text and no image to answer");

  auto opt = [&](const char* key) { return j.contains(key) && !j[key].is_null(); };
  if (opt("max_completion_tokens")) r.max_tokens = int(integer(j["max_completion_tokens"], "max_completion_tokens", 1, lim.max_tokens));
  if (opt("max_tokens")) r.max_tokens = int(integer(j["max_tokens"], "max_tokens", 1, lim.max_tokens));
  if (opt("temperature")) r.temperature = number(j["temperature"], "temperature", 0, 2);
  if (opt("top_p")) r.top_p = number(j["top_p"], "top_p", 0, 1);
  if (opt("top_k")) r.top_k = int(integer(j["top_k"], "top_k", 0, 1000000));
  if (opt("seed")) {
    if (!j["seed"].is_number_integer() && !j["seed"].is_number_unsigned()) throw bad("seed", "must be an integer");
    r.seed = j["seed"].is_number_unsigned() ? j["seed"].get<uint64_t>() : uint64_t(j["seed"].get<int64_t>());
  }
  if (opt("n") && integer(j["n"], "n", 1, 1000) != 1) throw bad("n", "only n = 1 is supported");
  if (opt("stop")) {
    const auto& s = j["stop"];
    if (s.is_string()) {
      r.stop.push_back(s.get<std::string>());
    } else if (s.is_array()) {
      if (s.size() > 4) throw bad("stop", "at most 4 stop sequences");
      for (size_t i = 0; i < s.size(); ++i) {
        if (!s[i].is_string()) throw bad("stop[" + std::to_string(i) + "]", "must be a string");
        r.stop.push_back(s[i].get<std::string>());
      }
    } else {
      throw bad("stop", "must be a string or an array of strings");
    }
    for (auto& s : r.stop)
      if (s.empty() || s.size() > 256) throw bad("stop", "each stop sequence must have 1 to 256 bytes");
  }
  if (opt("stream")) {
    if (!j["stream"].is_boolean()) throw bad("stream", "must be true or false");
    r.stream = j["stream"].get<bool>();
  }
  if (opt("ignore_eos")) {
    if (!j["ignore_eos"].is_boolean()) throw bad("ignore_eos", "must be true or false");
    r.ignore_eos = j["ignore_eos"].get<bool>();
  }
  if (opt("max_crops")) r.max_crops = int(integer(j["max_crops"], "max_crops", 1, 64));
  if (opt("max_image_tokens")) r.max_image_tokens = int(integer(j["max_image_tokens"], "max_image_tokens", 1, 1 << 20));
  if (opt("stream_options")) {
    const auto& so = j["stream_options"];
    if (!so.is_object()) throw bad("stream_options", "must be an object");
    if (so.contains("include_usage")) {
      if (!so["include_usage"].is_boolean()) throw bad("stream_options.include_usage", "must be true or false");
      r.include_usage = so["include_usage"].get<bool>();
    }
  }
  return r;
}

// ---- UTF-8 ----

std::string sanitize_utf8(const std::string& in) {
  // The WHATWG Encoding standard's UTF-8 decoder: each maximal invalid subpart becomes one
  // U+FFFD (what browsers and Node do with the same bytes).
  static const std::string kReplacement = "\xEF\xBF\xBD";
  std::string out;
  out.reserve(in.size());
  int needed = 0, seen = 0;
  unsigned lower = 0x80, upper = 0xBF;
  size_t start = 0;
  for (size_t i = 0; i < in.size(); ++i) {
    const auto b = uint8_t(in[i]);
    if (needed == 0) {
      start = i;
      if (b <= 0x7F) {
        out.push_back(char(b));
      } else if (b >= 0xC2 && b <= 0xDF) {
        needed = 1;
      } else if (b >= 0xE0 && b <= 0xEF) {
        if (b == 0xE0) lower = 0xA0;
        if (b == 0xED) upper = 0x9F;
        needed = 2;
      } else if (b >= 0xF0 && b <= 0xF4) {
        if (b == 0xF0) lower = 0x90;
        if (b == 0xF4) upper = 0x8F;
        needed = 3;
      } else {
        out += kReplacement;
      }
      continue;
    }
    if (b < lower || b > upper) {
      needed = seen = 0;
      lower = 0x80;
      upper = 0xBF;
      out += kReplacement;
      --i;  // the byte starts over
      continue;
    }
    lower = 0x80;
    upper = 0xBF;
    if (++seen == needed) {
      out.append(in, start, i - start + 1);
      needed = seen = 0;
    }
  }
  if (needed != 0) out += kReplacement;
  return out;
}

}  // namespace victor
