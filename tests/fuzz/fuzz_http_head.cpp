// libFuzzer: the gate's HTTP parsing (http_head.h), what every client's bytes meet first.
// Input: a request as a client would send it. Checks, beyond ASan/UBSan:
//  - finding the head's end incrementally (as bytes trickle in, from where the last search
//    stopped) gives the same place as one search of the whole input;
//  - a head is refused with 400/413/431 and nothing to forward, or accepted with a forwarded head
//    that ends in "Connection: close" and one blank line and carries no hop-by-hop header;
//  - the chunked body scanner gives the same verdict, total and consumed bytes whether the body
//    arrives at once or in pieces (sizes drawn from the input), never consumes past the body's end,
//    and an accepted chunked total is what the chunk headers declared.
#include <cstdlib>
#include <string>

#include "victor/serve/http_head.h"

using namespace victor;

namespace {
bool ends_with(const std::string& s, const std::string& t) {
  return s.size() >= t.size() && s.compare(s.size() - t.size(), t.size(), t) == 0;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string in(reinterpret_cast<const char*>(data), size);
  const size_t whole = find_head_end(in, 0);
  // Trickled in steps of 1..7 bytes.
  std::string acc;
  size_t found = std::string::npos;
  for (size_t at = 0, k = 0; at < in.size() && found == std::string::npos; ++k) {
    const size_t step = 1 + (k * 5 + size) % 7;
    const size_t searched = acc.size();
    acc.append(in, at, step);
    at += step;
    found = find_head_end(acc, searched);
  }
  if (found != whole) std::abort();
  if (whole == std::string::npos) return 0;

  HeadLimits limits;
  limits.max_header_bytes = 4096;
  limits.max_header_lines = 16;
  limits.max_body_bytes = 1 << 20;
  const HeadVerdict v = parse_request_head(in.substr(0, whole), limits);
  if (v.refusal != HeadVerdict::None) {
    if (v.status != 400 && v.status != 413 && v.status != 431) std::abort();
    if (!v.forwarded.empty() || v.message.empty()) std::abort();
    return 0;
  }
  if (!ends_with(v.forwarded, "\r\nConnection: close\r\n\r\n")) std::abort();
  if (v.forwarded.find("\r\n\r\n") != v.forwarded.size() - 4) std::abort();
  if (v.chunked && v.content_length != 0) std::abort();
  if (v.content_length > uint64_t(limits.max_body_bytes)) std::abort();
  if (!v.chunked) return 0;

  const std::string body = in.substr(whole + 4);
  ChunkScanner once;
  size_t used_once = 0;
  const bool ok_once = once.feed(body.data(), body.size(), &used_once);
  ChunkScanner pieces;
  size_t used = 0, at = 0;
  bool ok = true;
  for (size_t k = 0; at < body.size() && ok && pieces.st != ChunkScanner::Done; ++k) {
    const size_t n = std::min(body.size() - at, size_t(1 + uint8_t(body[k % body.size()]) % 13));
    size_t u = 0;
    ok = pieces.feed(body.data() + at, n, &u);
    if (ok && u > n) std::abort();
    if (ok && u < n && pieces.st != ChunkScanner::Done) std::abort();  // stops early only at the end
    used += u;
    at += n;
  }
  if (ok != ok_once) std::abort();
  if (ok && (used != used_once || pieces.total != once.total || pieces.st != once.st)) std::abort();
  if (ok_once && used_once > body.size()) std::abort();
  return 0;
}
