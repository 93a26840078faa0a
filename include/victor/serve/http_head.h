// The HTTP/1.1 request-head and chunked-body parsing of `victor serve`'s gate (serve/gate.h),
// apart from its sockets so it can be fuzzed (tests/fuzz/fuzz_http_head.cpp) and unit-tested.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace victor {

struct HeadLimits {
  size_t max_header_bytes = 64 << 10;  // request line + headers (431 beyond)
  int max_header_lines = 100;          // header lines (431 beyond)
  int64_t max_body_bytes = 64 << 20;   // Content-Length or chunked total (413 beyond)
};

// Where the request head of `in` ends (the index of its "\r\n\r\n"), searching from `from`
// (the caller passes how much it had searched before, so a head that trickles in byte by byte
// costs linear time); npos while incomplete.
size_t find_head_end(const std::string& in, size_t from);

// What the gate does with a complete head.
struct HeadVerdict {
  enum Refusal { None, BadRequest, HeaderTooLarge, BodyTooLarge } refusal = None;
  int status = 0;              // 400, 413 or 431 when refused
  const char* reason = "";     // its reason phrase
  std::string message;         // what was wrong, for the client
  std::string forwarded;       // accepted: the head to relay (hop-by-hop headers dropped,
                               // "Connection: close" added, ending in an empty line)
  bool chunked = false;
  uint64_t content_length = 0;
};

// Validates and rewrites a request head (without its final "\r\n\r\n"): the request line, header
// syntax, header count, Content-Length (digits only, one of them, within the body limit),
// Transfer-Encoding (chunked only, never beside Content-Length).
HeadVerdict parse_request_head(const std::string& head, const HeadLimits& limits);

// A chunked body as it streams through: where it ends, and how many data bytes its chunk headers
// declare (known before the data arrives, so an oversized body is refused at once).
struct ChunkScanner {
  enum State { Size, Ext, SizeLf, Data, DataCr, DataLf, Trailer, TrailerLf, Done } st = Size;
  uint64_t chunk = 0, total = 0;
  int digits = 0, line = 0;

  // Consumes body bytes from p; returns false when malformed. *used: bytes that belong to the
  // body (fewer than n only once it is Done).
  bool feed(const char* p, size_t n, size_t* used);
};

}  // namespace victor
