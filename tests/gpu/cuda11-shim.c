/* Stand-ins for the CUDA 11.8 cuBLAS and cuRAND that a `--features cuda` build made with
 * Debian's toolkit links to, for running it on a GPU machine that has only a newer CUDA.
 * The build's imports are versioned (`cublasCreate_v2@libcublas.so.11`), so the newer
 * libraries cannot serve them directly. Each function here is one the build imports
 * (`objdump -T`); it forwards to the same function of the library named by
 * FEDIMDB_REAL_CUBLAS or FEDIMDB_REAL_CURAND. Built twice by cuda-engine-tests.sh: with
 * -DCUBLAS as libcublas.so.11, without as libcurand.so.10. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

static void *real(const char *var) {
  static void *handle;
  if (!handle) {
    const char *path = getenv(var);
    handle = path ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
    if (!handle) {
      fprintf(stderr, "cuda11-shim: cannot open %s (%s): %s\n", var, path ? path : "unset",
              path ? dlerror() : "set it to the GPU machine's library");
      abort();
    }
  }
  return handle;
}

#define FORWARD(var, name, params, args)                                        \
  int name params {                                                             \
    static int(*f) params;                                                      \
    if (!f && !(f = (int(*) params)dlsym(real(var), #name))) {                  \
      fprintf(stderr, "cuda11-shim: %s has no %s\n", getenv(var), #name);       \
      abort();                                                                  \
    }                                                                           \
    return f args;                                                              \
  }

#ifdef CUBLAS
#define B "FEDIMDB_REAL_CUBLAS"
FORWARD(B, cublasCreate_v2, (void **h), (h))
FORWARD(B, cublasDestroy_v2, (void *h), (h))
FORWARD(B, cublasSetStream_v2, (void *h, void *s), (h, s))
FORWARD(B, cublasDgemmStridedBatched,
        (void *h, int ta, int tb, int m, int n, int k, const double *alpha, const double *a,
         int lda, long long sa, const double *b, int ldb, long long sb, const double *beta,
         double *c, int ldc, long long sc, int count),
        (h, ta, tb, m, n, k, alpha, a, lda, sa, b, ldb, sb, beta, c, ldc, sc, count))
FORWARD(B, cublasGemmStridedBatchedEx,
        (void *h, int ta, int tb, int m, int n, int k, const void *alpha, const void *a,
         int at, int lda, long long sa, const void *b, int bt, int ldb, long long sb,
         const void *beta, void *c, int ct, int ldc, long long sc, int count, int compute,
         int algo),
        (h, ta, tb, m, n, k, alpha, a, at, lda, sa, b, bt, ldb, sb, beta, c, ct, ldc, sc, count,
         compute, algo))
#else
#define R "FEDIMDB_REAL_CURAND"
FORWARD(R, curandCreateGenerator, (void **g, int kind), (g, kind))
FORWARD(R, curandDestroyGenerator, (void *g), (g))
FORWARD(R, curandSetPseudoRandomGeneratorSeed, (void *g, unsigned long long seed), (g, seed))
FORWARD(R, curandSetStream, (void *g, void *s), (g, s))
#endif
