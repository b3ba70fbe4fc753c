/* A small stand-in for libpython, for the `elf` fuzz target's seed corpus: the symbols
 * pyleak looks for (_PyRuntime, Py_Version, the allocator tables and entry points, the
 * shutdown and start-up functions) in a 14 KB file. Build (fuzz/seeds/README.md):
 * cc -shared -fPIC -nostdlib -O1 -s -o corpus/elf/fake-libpython.so seeds/fake_libpython.c */
typedef struct { void *ctx; void *(*malloc)(void *, unsigned long); void *(*calloc)(void *, unsigned long, unsigned long);
                 void *(*realloc)(void *, void *, unsigned long); void (*free)(void *, void *); } PyMemAllocatorEx;
static char arena[1 << 12];
static unsigned long used;
static void *bump(void *ctx, unsigned long n) { (void)ctx; void *p = arena + used; used += (n + 15) & ~15UL; return p; }
static void *bump_calloc(void *ctx, unsigned long a, unsigned long b) { return bump(ctx, a * b); }
static void *bump_realloc(void *ctx, void *p, unsigned long n) { (void)p; return bump(ctx, n); }
static void drop(void *ctx, void *p) { (void)ctx; (void)p; }
PyMemAllocatorEx _PyObject = {0, bump, bump_calloc, bump_realloc, drop};
PyMemAllocatorEx _PyMem = {0, bump, bump_calloc, bump_realloc, drop};
PyMemAllocatorEx _PyMem_Raw = {0, bump, bump_calloc, bump_realloc, drop};
const unsigned long Py_Version = 0x030C01F0;
char _PyRuntime[256] = "xdebugpy";
void *PyObject_Malloc(unsigned long n) { return _PyObject.malloc(_PyObject.ctx, n); }
void PyObject_Free(void *p) { _PyObject.free(_PyObject.ctx, p); }
void *PyMem_Malloc(unsigned long n) { return _PyMem.malloc(_PyMem.ctx, n); }
void *PyMem_RawMalloc(unsigned long n) { return _PyMem_Raw.malloc(_PyMem_Raw.ctx, n); }
const char *Py_GetVersion(void) { return "3.12.1"; }
int Py_FinalizeEx(void) { return 0; }
void Py_InitializeFromConfig(void *c) { (void)c; }
