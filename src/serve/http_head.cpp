// The gate's request-head and chunked-body parsing (http_head.h).
#include "victor/serve/http_head.h"

#include <algorithm>
#include <cctype>
#include <vector>

namespace victor {

namespace {

std::string lower(std::string s) {
  for (auto& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string trim(const std::string& s) {
  const size_t a = s.find_first_not_of(" \t"), b = s.find_last_not_of(" \t");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

}  // namespace

size_t find_head_end(const std::string& in, size_t from) {
  return in.find("\r\n\r\n", from > 3 ? from - 3 : 0);
}

HeadVerdict parse_request_head(const std::string& head, const HeadLimits& o) {
  HeadVerdict v;
  auto refuse = [&](HeadVerdict::Refusal r, int status, const char* reason, std::string message) {
    v.refusal = r;
    v.status = status;
    v.reason = reason;
    v.message = std::move(message);
    v.forwarded.clear();
    return v;
  };
  if (head.size() > o.max_header_bytes)
    return refuse(HeadVerdict::HeaderTooLarge, 431, "Request Header Fields Too Large",
                  "request head larger than " + std::to_string(o.max_header_bytes) + " bytes");
  std::vector<std::string> lines;
  for (size_t at = 0; at <= head.size();) {
    size_t e = head.find("\r\n", at);
    if (e == std::string::npos) e = head.size();
    lines.push_back(head.substr(at, e - at));
    at = e + 2;
    if (int(lines.size()) - 1 > o.max_header_lines)
      return refuse(HeadVerdict::HeaderTooLarge, 431, "Request Header Fields Too Large",
                    "more than " + std::to_string(o.max_header_lines) + " header lines");
  }
  const std::string& request_line = lines[0];
  const size_t sp1 = request_line.find(' '), sp2 = request_line.rfind(' ');
  if (sp1 == std::string::npos || sp2 == sp1 || request_line.compare(sp2 + 1, 7, "HTTP/1.") != 0)
    return refuse(HeadVerdict::BadRequest, 400, "Bad Request", "malformed request line");
  v.forwarded = request_line + "\r\n";
  bool have_length = false;
  for (size_t i = 1; i < lines.size(); ++i) {
    const std::string& l = lines[i];
    const size_t colon = l.find(':');
    if (l.empty() || l[0] == ' ' || l[0] == '\t' || colon == std::string::npos || colon == 0)
      return refuse(HeadVerdict::BadRequest, 400, "Bad Request", "malformed header line");
    const std::string name = lower(l.substr(0, colon)), value = trim(l.substr(colon + 1));
    if (name == "content-length") {
      if (have_length) return refuse(HeadVerdict::BadRequest, 400, "Bad Request", "more than one Content-Length");
      if (value.empty() || value.size() > 19 || value.find_first_not_of("0123456789") != std::string::npos)
        return refuse(HeadVerdict::BadRequest, 400, "Bad Request",
                      "Content-Length '" + value.substr(0, 32) + "' is not a number of bytes");
      have_length = true;
      v.content_length = std::stoull(value);
    } else if (name == "transfer-encoding") {
      if (lower(value) != "chunked")
        return refuse(HeadVerdict::BadRequest, 400, "Bad Request",
                      "Transfer-Encoding '" + value.substr(0, 32) + "' is not supported");
      v.chunked = true;
    }
    if (name == "connection" || name == "keep-alive" || name == "proxy-connection") continue;
    v.forwarded += l + "\r\n";
  }
  if (have_length && v.chunked)
    return refuse(HeadVerdict::BadRequest, 400, "Bad Request", "both Content-Length and Transfer-Encoding");
  if (have_length && v.content_length > uint64_t(o.max_body_bytes))
    return refuse(HeadVerdict::BodyTooLarge, 413, "Payload Too Large",
                  "request body of " + std::to_string(v.content_length) + " bytes is larger than the limit of " +
                      std::to_string(o.max_body_bytes) + " bytes (--max-body-mb)");
  v.forwarded += "Connection: close\r\n\r\n";
  return v;
}

bool ChunkScanner::feed(const char* p, size_t n, size_t* used) {
  size_t i = 0;
  while (i < n && st != Done) {
    const char c = p[i];
    switch (st) {
      case Size:
        if (std::isxdigit(static_cast<unsigned char>(c))) {
          if (++digits > 15) return false;  // over 2^60: no body is that large
          chunk = chunk * 16 + uint64_t(std::isdigit(static_cast<unsigned char>(c)) ? c - '0' : std::tolower(c) - 'a' + 10);
        } else if (digits > 0 && (c == ';' || c == ' ' || c == '\t')) {
          st = Ext;
        } else if (digits > 0 && c == '\r') {
          st = SizeLf;
        } else {
          return false;
        }
        ++i;
        break;
      case Ext:
        if (c == '\r') st = SizeLf;
        else if (++line > 1024) return false;
        ++i;
        break;
      case SizeLf:
        if (c != '\n') return false;
        total += chunk;
        st = chunk == 0 ? Trailer : Data;
        line = 0;
        ++i;
        break;
      case Data: {
        const size_t take = size_t(std::min<uint64_t>(chunk, n - i));
        chunk -= take;
        i += take;
        if (chunk == 0) st = DataCr;
        break;
      }
      case DataCr:
        if (c != '\r') return false;
        st = DataLf;
        ++i;
        break;
      case DataLf:
        if (c != '\n') return false;
        st = Size;
        digits = 0;
        ++i;
        break;
      case Trailer:
        if (c == '\r') st = TrailerLf;
        else if (++line > 8192) return false;
        ++i;
        break;
      case TrailerLf:
        if (c != '\n') return false;
        st = line == 0 ? Done : Trailer;
        line = 0;
        ++i;
        break;
      case Done:
        break;
    }
  }
  *used = i;
  return true;
}

}  // namespace victor
