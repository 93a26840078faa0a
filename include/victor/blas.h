// The BLAS under LibTorch: make sure it runs its fast kernels on this CPU.
#pragma once
#include <string>

namespace victor {

// The kernel set OpenBLAS chose at load time ("SkylakeX", "Haswell", ...), or "" when the BLAS is
// not OpenBLAS.
std::string blas_core_name();

// True for the kernel sets OpenBLAS falls back to on a CPU it does not know (nothing newer than SSE3).
bool is_generic_blas_core(const std::string& core);

// Debian 12's OpenBLAS 0.3.21 does not recognize newer CPUs (Intel family 6 model 207, Emerald
// Rapids, among them) and falls back to its Prescott (SSE3) kernels: a 640-row LLaMA MLP ran 4.9x
// slower on one such machine (docs/benchmarks.md). OpenBLAS reads OPENBLAS_CORETYPE only when it is
// loaded, so when it fell back on a CPU with AVX-512 (or AVX2 + FMA) this sets the variable and
// re-executes the program, argv unchanged. A user's own OPENBLAS_CORETYPE is respected; returns
// (does nothing) when there is nothing to fix or the re-exec fails.
void ensure_fast_blas(char** argv);

// glibc returns large freed buffers to the kernel and maps them again on the next allocation, so
// every training step and prefill paid page faults for all its activations. Keeps buffers up to
// 256 MiB in the heap, and freed memory there (notebook@f64a969, item 6). Call at start-up,
// before any large allocation; a user's own MALLOC_* tunables (or VICTOR_DEFAULT_MALLOC) win.
// `one_arena` (the server): every thread allocates from the one heap, so what an HTTP thread
// frees after decoding a large image is reused by the next request or trimmed, instead of staying
// in that thread's own arena (glibc never trims a thread arena's top; with the kept buffers above,
// 16 requests of 8 4096^2 images left 786 MiB resident from 173; with one arena 198).
void tune_allocator(bool one_arena = false);

}  // namespace victor
