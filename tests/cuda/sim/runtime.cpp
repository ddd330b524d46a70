// cudasim runtime: the device, the launch and the scheduler (see include/cudasim.h).
//
// Simulated threads are fibers on the calling OS thread, each with its own stack (reused across
// launches, a guard page below it). The scheduler switches to one fiber, which runs until its
// next barrier or its end and switches back. Under AddressSanitizer every switch is announced to
// it (__sanitizer_start/finish_switch_fiber) so it tracks the right stack.
//
// A switch on x86-64 is the few instructions below (Context); elsewhere, or with
// -DCUDASIM_UCONTEXT, it is ucontext's swapcontext, which also saves and restores the signal
// mask: two system calls per switch, ~10% of a simulated launch and more under a sandbox.
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <deque>
#include <cerrno>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cudasim.h"
#include "sim_api.h"

#if defined(__SANITIZE_ADDRESS__)
#include <dlfcn.h>
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUDASIM_ASAN 1
#else
#define CUDASIM_ASAN 0
#endif

// The ThreadSanitizer build (-DCUDASIM_TSAN=1; simulate.py): the kernels are compiled with
// -fsanitize=thread, this file is not (its bookkeeping is shared by every fiber and is not the
// kernels' memory). Each simulated thread is a TSan fiber, every switch is made without
// synchronizing (__tsan_switch_to_fiber_no_sync), and the only happens-before edges are the
// ones CUDA gives: the launch's start and end, __syncthreads, grid.sync, cluster.sync and
// mbarrier phases (tsan_arrive / tsan_depart). TSan then reports any two accesses to the same
// bytes, one a write, by different threads with no barrier between them: a race whichever
// order they run in, lost updates (read-modify-write) included, in shared and global memory.
#if defined(CUDASIM_TSAN) && CUDASIM_TSAN
#include <sanitizer/tsan_interface.h>
extern "C" {
void __tsan_read_range(void* addr, unsigned long size);
void __tsan_write_range(void* addr, unsigned long size);
void __tsan_ignore_thread_begin();
void __tsan_ignore_thread_end();
}
#else
#undef CUDASIM_TSAN
#define CUDASIM_TSAN 0
#endif

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace cudasim {
namespace {

struct Abort {};  // unwinds a simulated thread when its launch fails

enum class State {
  kRunnable, kAtBlockBarrier, kAtGridBarrier, kAtClusterBarrier, kAtMbarrier, kAtWarp, kAtWord,
  kDone
};

constexpr size_t kStackBytes = 256 * 1024;  // per fiber (ASan frames are large)

// mmap'd once, reused by every launch (until release_stacks); the lowest page is a guard page.
// Two mappings a stack, and every copy of this library a process loads (tests load mutant copies
// of csrc/) keeps its own: a process of the suite comes near Linux's vm.max_map_count (65530)
// unless the copies it is done with release theirs.
struct Stack {
  unsigned char* base = nullptr;
  static size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  Stack(Stack&& o) noexcept : base(o.base) { o.base = nullptr; }
  ~Stack() {
    if (base != nullptr) munmap(base - page(), kStackBytes + page());
  }
  Stack() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    // Two mappings a simulated thread (stack and guard page): a launch of 128 blocks of 256
    // threads passes Linux's default vm.max_map_count (65530). Say so instead of dying quietly.
    if (p == MAP_FAILED || mprotect(p, page, PROT_NONE) != 0) {
      std::fprintf(stderr,
                   "cudasim: cannot map another %zu KiB thread stack (%s); a launch of about "
                   "128 blocks of 256 threads passes the default vm.max_map_count: simulate a "
                   "device with fewer SMs\n",
                   kStackBytes / 1024, std::strerror(errno));
      std::abort();
    }
    base = static_cast<unsigned char*>(p) + page;
  }
};

#if defined(__x86_64__) && !defined(CUDASIM_UCONTEXT)
// A suspended context is its stack pointer. cudasim_switch(&from, to) pushes the callee-saved
// registers (SysV: rbx, rbp, r12-r15) and the SSE and x87 control words, stores rsp in *from,
// loads `to` and pops the same from there. Nothing else survives a call, so this is all a
// switch at a function call has to keep; the signal mask is never changed by the kernels.
extern "C" __attribute__((visibility("hidden"))) void cudasim_switch(void** from, void* to);
asm(R"(
  .text
  .p2align 4
  .globl cudasim_switch
  .hidden cudasim_switch
  .type cudasim_switch, @function
cudasim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cudasim_switch, .-cudasim_switch
)");

struct Context {
  void* sp = nullptr;
  // A fresh context on [stack, stack + bytes) that starts in entry(), as if called: the
  // frame cudasim_switch pops (control words as now, registers zero, so the frame-pointer
  // chain ends), entry's address to return to, and a null return address for entry itself.
  void init(unsigned char* stack, size_t bytes, void (*entry)()) {
    auto* top = reinterpret_cast<uint64_t*>(stack + bytes);  // 16-byte aligned
    uint64_t* f = top - 9;
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    f[0] = mxcsr | static_cast<uint64_t>(fpucw) << 32;
    for (int i = 1; i <= 6; ++i) f[i] = 0;  // r15, r14, r13, r12, rbx, rbp
    f[7] = reinterpret_cast<uint64_t>(entry);
    f[8] = 0;  // entry starts with rsp = top - 8, as after a call from an aligned frame
    sp = f;
  }
};
inline void switch_context(Context* from, Context* to) { cudasim_switch(&from->sp, to->sp); }
#else
struct Context {
  ucontext_t uc{};
  void init(unsigned char* stack, size_t bytes, void (*entry)()) {
    getcontext(&uc);
    uc.uc_stack.ss_sp = stack;
    uc.uc_stack.ss_size = bytes;
    uc.uc_link = nullptr;
    makecontext(&uc, entry, 0);
  }
};
void switch_context(Context* from, Context* to);  // below: swapcontext, libc's under ASan
#endif

struct Thread {
  Context ctx;
  State state = State::kRunnable;
  unsigned block = 0, tid = 0;
  const char* file = nullptr;  // where it waits at a block barrier
  int line = 0;
  unsigned char* stack = nullptr;
  struct Copy {
    void* dst;
    const void* src;
    size_t bytes;  // 0: already landed (Config::cp_async_early)
  };
  std::vector<Copy> open;                 // cp.async copies issued since the last commit
  std::deque<std::vector<Copy>> groups;   // committed groups, oldest first, not yet waited for
  const void* wait_bar = nullptr;         // kAtMbarrier: the mbarrier and the phase parity
  unsigned wait_parity = 0;               // it waits for
  void* tsan_fiber = nullptr;             // CUDASIM_TSAN: this thread's TSan context
  char tsan_name[40] = {};                // ... and its name in TSan's reports
  unsigned barriers_passed[3] = {};       // CUDASIM_TSAN: block, cluster, grid barriers so far
  unsigned warp_calls = 0;                // warp collectives (warp_exchange) so far
  const char* warp_op = nullptr;          // kAtWarp: the collective it waits in
  const unsigned* wait_word = nullptr;    // kAtWord: the word, and what it waits for it to hold
  unsigned wait_mask = 0, wait_want = 0;  // ((*wait_word & wait_mask) == wait_want)
};

// One warp's collectives (warp_exchange): two buffers, used alternately by a lane's calls.
// A lane released from call n may run on to call n + 1 (the other buffer) before a slower lane
// has copied call n's data out; it cannot reach call n + 2 before every lane has arrived at
// n + 1, by which time all have copied n's out.
constexpr size_t kWarpBytes = 64;  // the most one lane contributes
struct WarpExchange {
  const char* op = nullptr;  // the collective of the lanes that have arrived
  unsigned arrived = 0, departed = 0;
  unsigned char data[32][kWarpBytes];
};

// An mbarrier (sm_90) in dynamic shared memory: a phase completes when its pending arrivals
// and its transaction count (bytes announced by expect_tx, less the bytes st.async delivered)
// both reach zero. st.async data lands at its issue, or, as cp.async's late extreme, only when
// the phase it counts towards completes (Config::cp_async_early).
struct Mbarrier {
  unsigned count = 0, pending = 0;
  long tx = 0;
  unsigned phases = 0;  // completed so far; the current phase's parity is phases & 1
  std::vector<std::pair<void*, std::vector<unsigned char>>> landing;
};

struct Launch {
  void (*invoke)(const void*, void**) = nullptr;
  const void* func = nullptr;
  void** args = nullptr;
  dim3 grid, block;
  bool cooperative = false;  // cudaLaunchCooperativeKernel: grid.sync() allowed
  unsigned cluster = 0;      // blocks per cluster (cudaLaunchKernelExC), 0 = no clusters
  std::vector<unsigned char*> smem;  // one allocation of exactly `smem_bytes` per block
  size_t smem_bytes = 0;
  std::vector<Thread> threads;
  std::map<const void*, Mbarrier> mbarriers;
  std::vector<WarpExchange> warps;  // two per warp of the grid (warp_exchange)
  // Cluster launches: each block's shared memory as it was when its last thread exited. A
  // peer may not write there after that (on a GPU the memory is gone); the launch's end
  // compares (exited_smem_check).
  std::vector<std::vector<unsigned char>> exited_smem;
  // CUDASIM_TSAN's synchronization objects (only their addresses matter): the launch's start
  // and end, and two a barrier (block, cluster, grid), used alternately: a thread that has
  // passed barrier k and arrives at k + 1 must not give its new writes to a thread still on
  // its way out of barrier k.
  std::vector<unsigned char> sync;
  bool aborting = false;
  std::string error;  // first failure
};

// The defaults, or for a standalone program (which cannot call configure) the environment:
// CUDASIM_SMS, CUDASIM_ORDER (ascending, descending, shuffle), CUDASIM_CP_ASYNC_EARLY=1.
Config config_from_environment() {
  Config c;
  if (const char* v = std::getenv("CUDASIM_SMS")) c.sms = std::atoi(v);
  if (const char* v = std::getenv("CUDASIM_ORDER")) {
    const std::string o = v;
    c.order = o == "descending" ? kOrderDescending : o == "shuffle" ? kOrderShuffle
                                                                     : kOrderAscending;
  }
  if (const char* v = std::getenv("CUDASIM_CP_ASYNC_EARLY")) c.cp_async_early = v[0] == '1';
  return c;
}

Config g_config = config_from_environment();
std::mutex g_launch_mutex;  // one launch at a time (the scheduler state is global)
Launch* g_launch = nullptr;
Thread* g_current = nullptr;  // the running fiber
Context g_scheduler_ctx;
#if CUDASIM_TSAN
void* g_scheduler_fiber = nullptr;  // the calling thread's TSan context
#endif
#if CUDASIM_ASAN
const void* g_scheduler_stack = nullptr;  // the calling thread's stack, as ASan reports it
size_t g_scheduler_stack_size = 0;
#endif
std::vector<Stack>& stacks() {
  static std::vector<Stack> s;
  return s;
}
std::map<const void*, void (*)(const void*, void**)>& registry() {
  static std::map<const void*, void (*)(const void*, void**)> r;
  return r;
}
// Each kernel's describer (sim_api.h Describe), or none (the per-step kernels).
std::map<const void*, Describe>& describers() {
  static std::map<const void*, Describe> d;
  return d;
}
std::vector<int> g_last_launch;  // what the last described launch ran, then its number
// c10's current stream (set_current_stream): per thread, as c10's is.
thread_local cudaStream_t t_current_stream = nullptr;
long long g_on_stream = 0, g_off_stream = 0;  // launches that named it, and another
thread_local int t_device = 0;  // the current device (cudaGetDevice), per thread as CUDA's
int g_described = 0;             // described launches so far
std::map<const void*, int>& max_dynamic_smem() {
  static std::map<const void*, int> m;
  return m;
}
std::map<const void*, int>& non_portable_clusters() {
  static std::map<const void*, int> m;
  return m;
}
// Every runtime call that fails leaves its error here, as the CUDA runtime does (not sticky:
// cudaGetLastError returns and clears it); a successful call leaves it as it was.
thread_local cudaError_t t_last_error = cudaSuccess;
cudaError_t failed(cudaError_t e) { return t_last_error = e; }
unsigned g_refuse = 0;  // refuse(): the calls a GPU may refuse that this device refuses
std::string g_last_message;
std::string g_kernel_failure;  // a cluster launch's own failure, until kernel_failure() takes it

constexpr int kDefaultDynamicSmem = 48 * 1024;
constexpr int kMaxThreadsPerSm = 2048;
constexpr int kReservedSmemPerBlock = 1024;

#if !defined(__x86_64__) || defined(CUDASIM_UCONTEXT)
#if CUDASIM_ASAN
// ASan's swapcontext interceptor clears the shadow of the target's whole stack (32 KB for a
// fiber's 256 KB) before and after every switch, and it unpoisons the live frames of the fiber
// switched to. The switches are announced to ASan (__sanitizer_start/finish_switch_fiber), so
// libc's own swapcontext is called instead, found through libc's handle, which the interceptor
// does not cover; init_fiber clears each stack's shadow once a launch instead.
using SwapContext = int (*)(ucontext_t*, const ucontext_t*);
SwapContext libc_swapcontext() {
  static const SwapContext fn = [] {
    void* libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
    void* sym = libc ? dlsym(libc, "swapcontext") : nullptr;
    return sym ? reinterpret_cast<SwapContext>(sym) : &swapcontext;
  }();
  return fn;
}
void switch_context(Context* from, Context* to) { libc_swapcontext()(&from->uc, &to->uc); }
#else
void switch_context(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }
#endif
#endif

// Fiber -> scheduler. `finished`: the fiber will never run again.
void switch_to_scheduler(bool finished) {
#if CUDASIM_TSAN
  __tsan_switch_to_fiber(g_scheduler_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#if CUDASIM_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake, g_scheduler_stack,
                                 g_scheduler_stack_size);
  switch_context(&g_current->ctx, &g_scheduler_ctx);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  (void)finished;
  switch_context(&g_current->ctx, &g_scheduler_ctx);
#endif
}

// Hands control back to the scheduler and returns when scheduled again.
void yield(State s) {
  g_current->state = s;
  switch_to_scheduler(false);
  if (g_launch->aborting) throw Abort{};
}

// CUDASIM_TSAN: the synchronization objects of the launch (Launch::sync).
enum SyncObject : size_t { kSyncStart = 0, kSyncEnd = 1, kSyncBarriers = 2 };
enum BarrierKind : unsigned { kBlockBarrier = 0, kClusterBarrier = 1, kGridBarrier = 2 };
size_t sync_objects(const Launch& L) {
  const size_t clusters = L.cluster > 0 ? L.grid.x / L.cluster : 0;
  return kSyncBarriers + 2 * (L.grid.x + clusters + 1);
}
#if CUDASIM_TSAN
// The object of the current thread's next barrier of this kind (for its block, cluster or
// the grid), of the two that alternate.
void* barrier_object(BarrierKind kind) {
  Launch& L = *g_launch;
  const size_t clusters = L.cluster > 0 ? L.grid.x / L.cluster : 0;
  const unsigned b = g_current->block;
  const size_t which = kind == kBlockBarrier     ? b
                       : kind == kClusterBarrier ? L.grid.x + b / L.cluster
                                                 : L.grid.x + clusters;
  return &L.sync[kSyncBarriers + 2 * which + (g_current->barriers_passed[kind] & 1)];
}
#endif
// Waits at a barrier of this kind: what this thread wrote before it happens before what every
// thread of the barrier does after it.
void barrier_wait(BarrierKind kind, State s) {
#if CUDASIM_TSAN
  void* obj = barrier_object(kind);
  __tsan_release(obj);
  yield(s);
  __tsan_acquire(obj);
  ++g_current->barriers_passed[kind];
#else
  (void)kind;
  yield(s);
#endif
}

void fiber_main() {
#if CUDASIM_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_scheduler_stack, &g_scheduler_stack_size);
#endif
  Launch* L = g_launch;
#if CUDASIM_TSAN
  __tsan_acquire(&L->sync[kSyncStart]);  // the launch's arguments and inputs
#endif
  try {
    if (!L->aborting) L->invoke(L->func, L->args);
  } catch (const Abort&) {
  }
  if ((!g_current->open.empty() || !g_current->groups.empty()) && L->error.empty()) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "block %u thread %u exited with cp.async copies never "
                  "waited for", g_current->block, g_current->tid);
    L->error = buf;
  }
  g_current->state = State::kDone;
  if (L->cluster > 0) {  // the block's last thread out: keep its shared memory as it is now
    const size_t first = (size_t)g_current->block * L->block.x;
    bool all = true;
    for (size_t k = 0; k < L->block.x && all; ++k) all = L->threads[first + k].state == State::kDone;
    if (all) {
      const unsigned char* m = L->smem[g_current->block];
#if CUDASIM_TSAN
      __tsan_ignore_thread_begin();  // the simulator's snapshot, not the kernel's read
#endif
      L->exited_smem[g_current->block].assign(m, m + L->smem_bytes);
#if CUDASIM_TSAN
      __tsan_ignore_thread_end();
#endif
    }
  }
#if CUDASIM_TSAN
  __tsan_release(&L->sync[kSyncEnd]);  // the launch's outputs, to the host
#endif
  switch_to_scheduler(true);
  std::abort();  // never resumed
}

// A write into a cluster peer's shared memory after the peer exited changed what the peer
// left: the first such block, as the launch's error.
void exited_smem_check(Launch& L) {
  for (size_t b = 0; b < L.exited_smem.size() && L.error.empty(); ++b) {
    const std::vector<unsigned char>& was = L.exited_smem[b];
    if (was.empty() || std::memcmp(was.data(), L.smem[b], was.size()) == 0) continue;
    size_t at = 0;
    while (was[at] == L.smem[b][at]) ++at;
    char buf[200];
    std::snprintf(buf, sizeof buf, "the shared memory of block %zu was written (byte %zu) after "
                  "the block exited: a cluster peer stored into it too late", b, at);
    L.error = buf;
  }
}

// A separate function: getcontext (the ucontext build) returns twice, which may clobber a
// caller's locals.
__attribute__((noinline)) void init_fiber(Thread& t, unsigned char* stack) {
  t.stack = stack;
#if CUDASIM_ASAN
  // Frames a finished (or unwound) fiber never returned from may have left poisoned redzones.
  __asan_unpoison_memory_region(t.stack, kStackBytes);
#endif
  t.ctx.init(t.stack, kStackBytes, fiber_main);
#if CUDASIM_TSAN
  t.tsan_fiber = __tsan_create_fiber(0);
  std::snprintf(t.tsan_name, sizeof t.tsan_name, "block %u thread %u", t.block, t.tid);
  __tsan_set_fiber_name(t.tsan_fiber, t.tsan_name);
#endif
}

// Runs thread i until its next barrier or its end.
void run_one(Launch& L, size_t i) {
  Thread& t = L.threads[i];
  g_current = &t;
  threadIdx = dim3(t.tid);
  blockIdx = dim3(t.block);
  blockDim = L.block;
  gridDim = L.grid;
#if CUDASIM_TSAN
  __tsan_switch_to_fiber(t.tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#if CUDASIM_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, t.stack, kStackBytes);
  switch_context(&g_scheduler_ctx, &t.ctx);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  switch_context(&g_scheduler_ctx, &t.ctx);
#endif
  g_current = nullptr;
}

std::string describe(const Launch& L, size_t i) {
  const Thread& t = L.threads[i];
  char buf[160];
  std::snprintf(buf, sizeof buf, "block %u thread %u", t.block, t.tid);
  return buf;
}

// Called when no thread can run. Releases one block barrier (else one cluster's barrier, else
// the grid barrier when every thread waits there, else the threads whose polled words now hold
// what they wait for). Returns false when all threads are done.
//
// One block at a time, picked by the order (first, last or random): the released block runs
// on to its next barrier while the others wait, so blocks drift apart as far as the grid
// barriers allow. A missing grid.sync() then lets one block run whole steps ahead and read
// exchange data the others have not written, which changes the results.
bool resolve_barriers(Launch& L, std::mt19937_64& rng) {
  const unsigned per_block = L.block.x;
  std::vector<unsigned> ready;  // blocks whose threads all wait at __syncthreads()
  for (unsigned b = 0; b < L.grid.x; ++b) {
    Thread* first = &L.threads[(size_t)b * per_block];
    size_t at_block = 0;
    for (unsigned k = 0; k < per_block; ++k) at_block += first[k].state == State::kAtBlockBarrier;
    if (at_block == 0) continue;
    // The block is not ready, but may become so once a phase completes or a word is stored.
    bool mbar_waits = false;
    for (unsigned k = 0; k < per_block; ++k)
      mbar_waits |= first[k].state == State::kAtMbarrier || first[k].state == State::kAtWord;
    if (mbar_waits) continue;
    if (at_block != per_block) {
      const Thread* waiting = first;
      while (waiting->state != State::kAtBlockBarrier) ++waiting;
      for (unsigned k = 0; k < per_block; ++k)
        if (first[k].state != State::kAtBlockBarrier)
          fail("__syncthreads() at %s:%d is not reached by block %u thread %u (%s)",
               waiting->file, waiting->line, b, k,
               first[k].state == State::kDone            ? "it exited"
               : first[k].state == State::kAtGridBarrier ? "it waits at grid.sync()"
               : first[k].state == State::kAtWarp        ? "it waits in a warp collective"
                                                         : "it waits at cluster.sync()");
    }
    for (unsigned k = 1; k < per_block; ++k)
      if (first[k].line != first->line || std::strcmp(first[k].file, first->file) != 0)
        fail("block %u waits at two different __syncthreads(): %s:%d (thread 0) and %s:%d "
             "(thread %u)", b, first->file, first->line, first[k].file, first[k].line, k);
    ready.push_back(b);
  }
  if (!ready.empty()) {
    unsigned pick = ready.front();
    if (g_config.order == kOrderDescending) pick = ready.back();
    if (g_config.order == kOrderShuffle) pick = ready[rng() % ready.size()];
    Thread* first = &L.threads[(size_t)pick * per_block];
    for (unsigned k = 0; k < per_block; ++k) first[k].state = State::kRunnable;
    return true;
  }
  if (L.cluster > 0) {  // one cluster at a time, like blocks: clusters never wait for each other
    std::vector<unsigned> ready_clusters;
    const size_t per_cluster = (size_t)L.cluster * per_block;
    for (unsigned c = 0; c < L.grid.x / L.cluster; ++c) {
      const Thread* first = &L.threads[c * per_cluster];
      size_t at = 0;
      for (size_t k = 0; k < per_cluster; ++k) at += first[k].state == State::kAtClusterBarrier;
      if (at == per_cluster) {
        ready_clusters.push_back(c);
      } else if (at > 0) {
        for (size_t k = 0; k < per_cluster; ++k)
          if (first[k].state == State::kDone)
            fail("cluster.sync() is not reached by %s of cluster %u (it exited)",
                 describe(L, c * per_cluster + k).c_str(), c);
      }
    }
    if (!ready_clusters.empty()) {
      unsigned pick = ready_clusters.front();
      if (g_config.order == kOrderDescending) pick = ready_clusters.back();
      if (g_config.order == kOrderShuffle) pick = ready_clusters[rng() % ready_clusters.size()];
      for (size_t k = 0; k < per_cluster; ++k)
        L.threads[pick * per_cluster + k].state = State::kRunnable;
      return true;
    }
  }
  size_t at_grid = 0, done = 0;
  for (const Thread& t : L.threads) {
    at_grid += t.state == State::kAtGridBarrier;
    done += t.state == State::kDone;
  }
  if (done == L.threads.size()) return false;
  if (at_grid == L.threads.size()) {
    for (Thread& t : L.threads) t.state = State::kRunnable;
    return true;
  }
  // Threads polling tagged words (wait_word), last: a reader wakes only when nothing else can
  // go on, so a writer that does not wait for its readers overwrites a word before they see it.
  bool woke = false;
  for (Thread& t : L.threads) {
    if (t.state == State::kAtWord &&
        (__atomic_load_n(t.wait_word, __ATOMIC_RELAXED) & t.wait_mask) == t.wait_want) {
      t.state = State::kRunnable;
      woke = true;
    }
  }
  if (woke) return true;
  for (size_t i = 0; i < L.threads.size(); ++i) {
    const Thread& t = L.threads[i];
    if (t.state != State::kAtWord) continue;
    fail("%s waits for the word at %p to hold %#x under the mask %#x (it holds %#x), which no "
         "thread can store: a deadlock", describe(L, i).c_str(),
         static_cast<const void*>(t.wait_word), t.wait_want, t.wait_mask,
         __atomic_load_n(t.wait_word, __ATOMIC_RELAXED));
  }
  for (size_t i = 0; i < L.threads.size(); ++i) {
    const Thread& t = L.threads[i];
    if (t.state != State::kAtMbarrier) continue;
    const Mbarrier& m = L.mbarriers.at(t.wait_bar);
    fail("%s waits for an mbarrier phase that never completes (%u arrivals and %ld bytes "
         "missing): a deadlock", describe(L, i).c_str(), m.pending, m.tx);
  }
  for (size_t i = 0; i < L.threads.size(); ++i)
    if (L.threads[i].state == State::kAtWarp)
      fail("%s waits in %s, which not every lane of its warp reaches: a deadlock on a GPU",
           describe(L, i).c_str(), L.threads[i].warp_op);
  for (size_t i = 0; i < L.threads.size(); ++i)
    if (L.threads[i].state == State::kDone)
      fail("grid.sync() is not reached by %s (it exited)", describe(L, i).c_str());
  fail("scheduler: no thread can run");
}

void schedule(Launch& L) {
  std::mt19937_64 rng(g_config.seed);
  std::vector<size_t> order;
  for (;;) {
    order.clear();
    for (size_t i = 0; i < L.threads.size(); ++i)
      if (L.threads[i].state == State::kRunnable) order.push_back(i);
    if (order.empty()) {
      if (!resolve_barriers(L, rng)) return;
      continue;
    }
    if (g_config.order == kOrderDescending) std::reverse(order.begin(), order.end());
    if (g_config.order == kOrderShuffle) std::shuffle(order.begin(), order.end(), rng);
    for (size_t i : order) {
      run_one(L, i);
      if (!L.error.empty()) return;
    }
  }
}

}  // namespace

void fail(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (g_launch == nullptr) {
    std::fprintf(stderr, "cudasim: %s\n", buf);
    std::abort();
  }
  if (g_launch->error.empty()) g_launch->error = buf;
  throw Abort{};
}

void block_barrier(const char* file, int line) {
  g_current->file = file;
  g_current->line = line;
  barrier_wait(kBlockBarrier, State::kAtBlockBarrier);
}

void grid_barrier() {
  if (!g_launch->cooperative) fail("grid.sync() in a launch that is not cooperative");
  barrier_wait(kGridBarrier, State::kAtGridBarrier);
}

// Kernels compiled for an architecture before sm_90 (Config::ptx_version) have no cluster
// instructions: csrc's cluster branches are __trap() there, which kills the context.
void require_cluster_code(const char* what) {
  if (g_config.ptx_version < 90)
    fail("%s in a kernel compiled for compute_%d (csrc traps there)", what, g_config.ptx_version);
}

void cluster_barrier() {
  require_cluster_code("cluster.sync()");
  if (g_launch->cluster == 0) fail("cluster.sync() in a launch without clusters");
  barrier_wait(kClusterBarrier, State::kAtClusterBarrier);
}

unsigned char* dynamic_smem() { return g_launch->smem[blockIdx.x]; }

unsigned cluster_num_blocks() {
  require_cluster_code("a cluster_group");
  if (g_launch->cluster == 0) fail("a cluster_group in a launch without clusters");
  return g_launch->cluster;
}

unsigned cluster_block_rank() { return blockIdx.x % cluster_num_blocks(); }

bool is_shared(const void* p) {
  const unsigned char* own = g_launch->smem[blockIdx.x];
  const auto* q = static_cast<const unsigned char*>(p);
  return q >= own && q < own + g_launch->smem_bytes;
}

void require_shared(const void* p, size_t bytes, const char* what) {
  const unsigned char* own = g_launch->smem[blockIdx.x];
  const auto* q = static_cast<const unsigned char*>(p);
  if (q < own || q + bytes > own + g_launch->smem_bytes)
    fail("%s: the %zu bytes at %p are not all in this block's dynamic shared memory "
         "(%zu bytes at %p)", what, bytes, p, g_launch->smem_bytes, static_cast<const void*>(own));
}

void* cluster_map_shared(const void* p, unsigned rank) {
  const unsigned size = cluster_num_blocks();
  if (rank >= size) fail("map_shared_rank: rank %u in a cluster of %u blocks", rank, size);
  const unsigned char* own = g_launch->smem[blockIdx.x];
  const auto* q = static_cast<const unsigned char*>(p);
  if (q < own || q >= own + g_launch->smem_bytes)
    fail("map_shared_rank: %p is not in this block's dynamic shared memory", p);
  return g_launch->smem[blockIdx.x - blockIdx.x % size + rank] + (q - own);
}

// CUDASIM_TSAN: the simulator's own heap bookkeeping that a simulated thread does (mbarrier
// state: a node allocated by one thread, st.async data freed by the thread that completes the
// phase) is not the kernel's memory; while one of these lives, TSan ignores that thread's
// accesses, allocations included.
struct Bookkeeping {
#if CUDASIM_TSAN
  Bookkeeping() { __tsan_ignore_thread_begin(); }
  ~Bookkeeping() { __tsan_ignore_thread_end(); }
  Bookkeeping(const Bookkeeping&) = delete;
  Bookkeeping& operator=(const Bookkeeping&) = delete;
#endif
};

// A warp-synchronous all-gather (the .sync.aligned instructions: ldmatrix, mma.sync): every lane
// of the warp must call it with the same op, as its next warp collective, and the block's
// threads must fill whole warps. A lane deposits its `bytes`; the lanes that arrive first wait
// (a fiber state the scheduler does not run) and the last one releases them, so no lane goes
// on before all 32 have deposited. Each then copies all 32 deposits (lane l's at all + l *
// bytes). The deposits pass through this file's memory, which ThreadSanitizer is told to
// ignore (Bookkeeping): the collective orders nothing between the lanes (nor do ldmatrix and
// mma.sync on a GPU).
void warp_exchange(const char* op, const void* in, size_t bytes, void* all) {
  Launch& L = *g_launch;
  if (bytes > kWarpBytes) fail("%s: %zu bytes a lane (at most %zu)", op, bytes, kWarpBytes);
  if (L.block.x % 32 != 0)
    fail("%s needs whole warps; the block has %u threads", op, L.block.x);
  const unsigned lane = g_current->tid % 32;
  const size_t first = (size_t)g_current->block * L.block.x + (g_current->tid - lane);
  const size_t warp = first / 32;
  WarpExchange& w = L.warps[2 * warp + (g_current->warp_calls++ & 1)];
  if (w.arrived == 0) {
    w.op = op;
  } else if (std::strcmp(w.op, op) != 0) {
    fail("block %u warp %zu: lanes in two different warp collectives at once (%s and %s)",
         g_current->block, (first % L.block.x) / 32, w.op, op);
  }
  {
    [[maybe_unused]] const Bookkeeping sim;  // the exchange's own memory, not the kernel's
    std::memcpy(w.data[lane], in, bytes);
  }
  if (++w.arrived < 32) {
    g_current->warp_op = op;
    yield(State::kAtWarp);
  } else {
    for (unsigned k = 0; k < 32; ++k) {
      Thread& t = L.threads[first + k];
      if (t.state == State::kAtWarp) t.state = State::kRunnable;
    }
  }
  auto* out = static_cast<unsigned char*>(all);
  {
    [[maybe_unused]] const Bookkeeping sim;
    for (unsigned k = 0; k < 32; ++k) std::memcpy(out + k * bytes, w.data[k], bytes);
  }
  if (++w.departed == 32) w.arrived = w.departed = 0;  // free for the lanes' call n + 2
}

// A copy the running thread makes (cp.async, st.async): under CUDASIM_TSAN its read and
// write are that thread's, whether or not libc's memcpy is intercepted.
static void copy_as_thread(void* dst, const void* src, size_t bytes) {
#if CUDASIM_TSAN
  __tsan_read_range(const_cast<void*>(src), bytes);
  __tsan_write_range(dst, bytes);
#endif
  std::memcpy(dst, src, bytes);
}

// cp.async may land any time between its issue and the wait_group that retires its group. The
// two extremes are simulated (Config::cp_async_early): at the wait, so a read before it (or
// before the barrier after it) sees the old bytes; or at the issue, so a buffer still being read
// by other threads is overwritten at once. A correct kernel gives the same bits either way.
// Copies not yet committed to a group are never retired by a wait.
void cp_async(void* dst, const void* src, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || reinterpret_cast<uintptr_t>(src) % bytes != 0)
    fail("cp.async of %zu bytes needs %zu-byte aligned addresses (dst %p, src %p)", bytes, bytes,
         dst, src);
  if (g_config.cp_async_early) {
    copy_as_thread(dst, src, bytes);
    g_current->open.push_back({dst, src, 0});
  } else {
    g_current->open.push_back({dst, src, bytes});
  }
}

void cp_async_commit() {
  g_current->groups.push_back(std::move(g_current->open));
  g_current->open.clear();
}

void cp_async_wait(int pending) {
  auto& groups = g_current->groups;
  while (groups.size() > static_cast<size_t>(pending)) {
    for (const Thread::Copy& c : groups.front())
      if (c.bytes != 0) copy_as_thread(c.dst, c.src, c.bytes);
    groups.pop_front();
  }
}

namespace {

// The block whose dynamic shared memory holds [p, p + bytes), or -1.
long smem_block(const void* p, size_t bytes) {
  const auto* q = static_cast<const unsigned char*>(p);
  for (size_t b = 0; b < g_launch->smem.size(); ++b)
    if (q >= g_launch->smem[b] && q + bytes <= g_launch->smem[b] + g_launch->smem_bytes)
      return static_cast<long>(b);
  return -1;
}

// CUDASIM_TSAN: an arrival (or st.async) on `bar` in the phase of this parity happens before
// what a thread waiting for that phase does after its wait.
enum class PhaseSide { kArrive, kWait };
void mbarrier_sync(const void* bar, unsigned parity, PhaseSide side) {
#if CUDASIM_TSAN
  void* obj = const_cast<char*>(static_cast<const char*>(bar)) + (parity & 1);
  if (side == PhaseSide::kArrive) __tsan_release(obj);
  else __tsan_acquire(obj);
#else
  (void)bar, (void)parity, (void)side;
#endif
}

Mbarrier& mbarrier_at(const void* bar, const char* what) {
  auto it = g_launch->mbarriers.find(bar);
  if (it == g_launch->mbarriers.end()) fail("%s: %p is not an initialised mbarrier", what, bar);
  return it->second;
}

// Completes the current phase if nothing is pending: lands its st.async data and releases the
// threads that wait for it.
void complete_if_done(const void* bar, Mbarrier& m) {
  if (m.tx <= -(1L << 20) || m.tx >= (1L << 20))
    fail("mbarrier %p: transaction count %ld outside the hardware's range", bar, m.tx);
  if (m.pending != 0 || m.tx != 0) return;
  for (auto& [dst, bytes] : m.landing) copy_as_thread(dst, bytes.data(), bytes.size());
  {
    [[maybe_unused]] const Bookkeeping b;
    m.landing.clear();
  }
  const unsigned parity = m.phases & 1;
  ++m.phases;
  m.pending = m.count;
  for (Thread& t : g_launch->threads)
    if (t.state == State::kAtMbarrier && t.wait_bar == bar && t.wait_parity == parity)
      t.state = State::kRunnable;
}

}  // namespace

void mbarrier_init(void* bar, unsigned count) {
  if (reinterpret_cast<uintptr_t>(bar) % 8 != 0 || smem_block(bar, 8) != (long)blockIdx.x)
    fail("mbarrier.init: %p is not an 8-byte aligned word of this block's shared memory", bar);
  if (count == 0) fail("mbarrier.init with an arrival count of 0");
  [[maybe_unused]] const Bookkeeping b;
  Mbarrier& m = g_launch->mbarriers[bar];
  m = Mbarrier{};
  m.count = m.pending = count;
}

void mbarrier_arrive_expect_tx(void* bar, unsigned bytes) {
  if (smem_block(bar, 8) != (long)blockIdx.x)
    fail("mbarrier.arrive.expect_tx: %p is not in this block's shared memory", bar);
  Mbarrier& m = mbarrier_at(bar, "mbarrier.arrive.expect_tx");
  if (m.pending == 0) fail("mbarrier %p: more arrivals than its count in one phase", bar);
  const unsigned parity = m.phases & 1;
  m.tx += bytes;
  --m.pending;
  complete_if_done(bar, m);
  mbarrier_sync(bar, parity, PhaseSide::kArrive);
}

void wait_word(const unsigned* p, unsigned mask, unsigned want) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(unsigned) != 0)
    fail("a tagged word at %p is not 4-byte aligned", static_cast<const void*>(p));
  if ((__atomic_load_n(p, __ATOMIC_RELAXED) & mask) == want) return;
  g_current->wait_word = p;
  g_current->wait_mask = mask;
  g_current->wait_want = want;
  yield(State::kAtWord);  // resumed once the word holds it (resolve_barriers)
}

void mbarrier_wait_parity(const void* bar, unsigned parity) {
  if (smem_block(bar, 8) != (long)blockIdx.x)
    fail("mbarrier.try_wait: %p is not in this block's shared memory", bar);
  const Mbarrier& m = mbarrier_at(bar, "mbarrier.try_wait");
  if ((m.phases & 1) == (parity & 1)) {  // else the phase of that parity has completed
    g_current->wait_bar = bar;
    g_current->wait_parity = parity & 1;
    yield(State::kAtMbarrier);
  }
  mbarrier_sync(bar, parity, PhaseSide::kWait);
}

void st_async(void* dst, const void* src, size_t bytes, void* bar) {
  const unsigned size = cluster_num_blocks();
  const unsigned first = blockIdx.x - blockIdx.x % size;
  const long to = smem_block(dst, bytes);
  if (to < (long)first || to >= (long)(first + size) || smem_block(bar, 8) != to)
    fail("st.async: %p (%zu bytes) and its mbarrier %p must lie in one shared memory of this "
         "block's cluster", dst, bytes, bar);
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0)
    fail("st.async of %zu bytes to a misaligned address %p", bytes, dst);
  bool exited = true;
  for (unsigned k = 0; k < g_launch->block.x; ++k)
    exited &= g_launch->threads[(size_t)to * g_launch->block.x + k].state == State::kDone;
  if (exited) fail("st.async into the shared memory of block %ld, which has exited", to);
  Mbarrier& m = mbarrier_at(bar, "st.async");
  const unsigned parity = m.phases & 1;
  if (g_config.cp_async_early) {
    copy_as_thread(dst, src, bytes);
  } else {
#if CUDASIM_TSAN
    __tsan_read_range(const_cast<void*>(src), bytes);  // read now, written when it lands
#endif
    [[maybe_unused]] const Bookkeeping keep;
    const auto* b = static_cast<const unsigned char*>(src);
    m.landing.emplace_back(dst, std::vector<unsigned char>(b, b + bytes));
  }
  m.tx -= static_cast<long>(bytes);
  complete_if_done(bar, m);
  mbarrier_sync(bar, parity, PhaseSide::kArrive);
}

long long tick() {
  static long long ticks = 0;  // fibers of one launch share one OS thread
  return ++ticks;
}

namespace {
long long g_mma_count = 0;  // fibers share one OS thread (and this file is not instrumented)
}  // namespace
void count_mma() { ++g_mma_count; }
long long mma_count() { return g_mma_count; }
namespace {
long long g_frag_stores[2] = {0, 0};  // generic and .shared forms, as g_mma_count
}  // namespace
void count_frag_store(bool shared) { ++g_frag_stores[shared ? 1 : 0]; }
long long frag_store_count(bool shared) {
  // All stores (every one goes through store_matrix_sync), or the .shared ones.
  return shared ? g_frag_stores[1] : g_frag_stores[0];
}
namespace {
long long g_point_batch_count = 0;  // as g_mma_count
}  // namespace
void count_point_batch() { ++g_point_batch_count; }
namespace {
long long g_mma_sync_count = 0;  // as g_mma_count
}  // namespace
void count_mma_sync() { ++g_mma_sync_count; }
long long mma_sync_count() { return g_mma_sync_count; }
namespace {
long long g_ldmatrix[2] = {0, 0};  // matrices, wavefronts; as g_mma_count
}  // namespace
void count_ldmatrix(int matrices, int wavefronts) {
  g_ldmatrix[0] += matrices;
  g_ldmatrix[1] += wavefronts;
}
long long ldmatrix_count(bool wavefronts) { return g_ldmatrix[wavefronts ? 1 : 0]; }
long long point_batch_count() { return g_point_batch_count; }

void configure(const Config& c) { g_config = c; }
const Config& config() { return g_config; }
const std::string& last_message() { return g_last_message; }
std::string kernel_failure() {
  std::string f;
  f.swap(g_kernel_failure);
  return f;
}
void set_last_error(int code) { t_last_error = static_cast<cudaError_t>(code); }
void refuse(unsigned calls) { g_refuse = calls; }
bool release_stacks() {
  if (g_launch != nullptr) return false;  // a fiber runs on them
  stacks().clear();
  return true;
}

void register_kernel(const void* func, void (*invoke)(const void*, void**), Describe describe) {
  registry()[func] = invoke;
  if (describe != nullptr) describers()[func] = describe;
}

const std::vector<int>& last_launch() { return g_last_launch; }

cudaStream_t current_stream() { return t_current_stream; }
void set_current_device(int device) { t_device = device; }
void set_current_stream(uintptr_t stream) {
  t_current_stream = reinterpret_cast<cudaStream_t>(stream);
}
void stream_launches(long long* on, long long* off) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  *on = g_on_stream;
  *off = g_off_stream;
}

}  // namespace cudasim

namespace nvcuda {
namespace wmma {
void check_pointer(const void* p, unsigned ldm_bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    ::cudasim::fail("%s: pointer %p is not 32-byte aligned", what, p);
  if (ldm_bytes % 16 != 0)
    ::cudasim::fail("%s: ldm of %u bytes is not a multiple of 16 bytes", what, ldm_bytes);
}
}  // namespace wmma
}  // namespace nvcuda

using cudasim::g_config;

cudaError_t cudaGetDevice(int* device) {
  *device = cudasim::t_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device != 0) return cudasim::failed(cudaErrorInvalidDevice);
  cudasim::t_device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudasim::failed(cudaErrorInvalidDevice);  // no such device here
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = g_config.sms; return cudaSuccess;
    case cudaDevAttrCooperativeLaunch: *value = 1; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = g_config.smem_optin; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
  }
  return cudasim::failed(cudaErrorInvalidValue);
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (cudasim::t_device != 0) return cudasim::failed(cudaErrorInvalidDevice);
  if (attr == cudaFuncAttributeNonPortableClusterSizeAllowed) {
    if (cudasim::g_refuse & cudasim::kRefuseNonPortableClusters)
      return cudasim::failed(cudaErrorNotSupported);
    cudasim::non_portable_clusters()[func] = value;
    return cudaSuccess;
  }
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize)
    return cudasim::failed(cudaErrorInvalidValue);
  if (value < 0 || value > g_config.smem_optin) return cudasim::failed(cudaErrorInvalidValue);
  cudasim::max_dynamic_smem()[func] = value;
  return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* func) {
  if (cudasim::t_device != 0) return cudasim::failed(cudaErrorInvalidDevice);
  *attr = cudaFuncAttributes{};
  attr->ptxVersion = g_config.ptx_version;
  attr->binaryVersion = 90;  // the simulated device is sm_90 (PTX is JIT-compiled for it)
  auto it = cudasim::max_dynamic_smem().find(func);
  attr->maxDynamicSharedSizeBytes =
      it == cudasim::max_dynamic_smem().end() ? cudasim::kDefaultDynamicSmem : it->second;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorImpl(int* blocks, const void* func,
                                                              int block_size, size_t smem) {
  if (cudasim::t_device != 0) return cudasim::failed(cudaErrorInvalidDevice);
  if (block_size <= 0 || block_size > 1024) return cudasim::failed(cudaErrorInvalidValue);
  const int by_threads = cudasim::kMaxThreadsPerSm / block_size;
  const size_t per_block = smem + cudasim::kReservedSmemPerBlock;
  const int by_smem = static_cast<int>((size_t)g_config.smem_per_sm / per_block);
  *blocks = std::min(by_threads, by_smem);
  // More dynamic shared memory than the function's MaxDynamicSharedMemorySize (48 KiB unless
  // raised): no block fits, as the CUDA occupancy calculator says (0 blocks, not an error), so
  // a query made before the attribute is raised reads as "does not fit".
  auto attr = cudasim::max_dynamic_smem().find(func);
  if (smem > (size_t)(attr == cudasim::max_dynamic_smem().end() ? cudasim::kDefaultDynamicSmem
                                                                  : attr->second))
    *blocks = 0;
  return cudaSuccess;
}

namespace cudasim {
namespace {

// Runs one launch to its end (both launch APIs): checks shared memory, sets up the fibers and
// schedules them.
cudaError_t run_launch(const void* func, dim3 grid, dim3 block, void** args, size_t smem,
                       bool cooperative, unsigned cluster, cudaStream_t stream) {
  g_last_message.clear();
  if (t_device != 0) return t_last_error = cudaErrorInvalidDevice;  // not the memory's device
  auto reg = registry().find(func);
  if (reg == registry().end()) return t_last_error = cudaErrorInvalidValue;
  auto attr = max_dynamic_smem().find(func);
  const int smem_limit = attr == max_dynamic_smem().end() ? kDefaultDynamicSmem : attr->second;
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1 || block.x == 0 ||
      block.x > 1024 || grid.x == 0 || smem > (size_t)smem_limit)
    return t_last_error = cudaErrorInvalidValue;
  int per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessorImpl(&per_sm, func, (int)block.x, smem);
  if (cooperative && (long)per_sm * g_config.sms < (long)grid.x)
    return t_last_error = cudaErrorCooperativeLaunchTooLarge;
  if (cluster > 0 && (long)per_sm * g_config.sms < (long)cluster)
    return t_last_error = cudaErrorClusterOutOfResources;

  std::lock_guard<std::mutex> lock(g_launch_mutex);
  ++(stream == t_current_stream ? g_on_stream : g_off_stream);
  auto describe = describers().find(func);  // before any thread runs: the launch's own params
  if (describe != describers().end()) {
    g_last_launch = describe->second(args);
    g_last_launch.push_back(++g_described);
  }
  Launch L;
  L.invoke = reg->second;
  L.func = func;
  L.args = args;
  L.grid = grid;
  L.block = block;
  L.cooperative = cooperative;
  L.cluster = cluster;
  L.smem_bytes = smem;
  if (cluster > 0) L.exited_smem.resize(grid.x);
  L.sync.resize(sync_objects(L));
  for (unsigned b = 0; b < grid.x; ++b) {
    void* p = nullptr;
    if (posix_memalign(&p, 128, std::max<size_t>(smem, 1)) != 0) std::abort();
    std::memset(p, 0xFF, std::max<size_t>(smem, 1));  // NaN in every float
    L.smem.push_back(static_cast<unsigned char*>(p));
  }
  const size_t n = (size_t)grid.x * block.x;
  while (stacks().size() < n) stacks().emplace_back();
  L.threads.resize(n);
  L.warps.resize((n + 31) / 32 * 2);  // warp_exchange (allocated here, not by a fiber)
  for (size_t i = 0; i < n; ++i) {
    Thread& t = L.threads[i];
    t.block = static_cast<unsigned>(i / block.x);
    t.tid = static_cast<unsigned>(i % block.x);
    init_fiber(t, stacks()[i].base);
  }
  g_launch = &L;
#if CUDASIM_TSAN
  g_scheduler_fiber = __tsan_get_current_fiber();
  __tsan_release(&L.sync[kSyncStart]);
#endif
  try {
    schedule(L);
  } catch (const Abort&) {  // a barrier rule broken (found by the scheduler)
  }
  if (!L.error.empty()) {  // unwind every fiber that has not finished
    L.aborting = true;
    for (size_t i = 0; i < n; ++i)
      if (L.threads[i].state != State::kDone) run_one(L, i);
  }
#if CUDASIM_TSAN
  __tsan_acquire(&L.sync[kSyncEnd]);
  for (Thread& t : L.threads) __tsan_destroy_fiber(t.tsan_fiber);
#endif
  exited_smem_check(L);
  for (unsigned char* p : L.smem) std::free(p);
  g_launch = nullptr;
  g_last_message = L.error;
  if (!L.error.empty()) return t_last_error = cudaErrorLaunchFailure;
  return cudaSuccess;
}

// The cluster size a launch config asks for (0: none) and whether it is cooperative; false if
// it is malformed.
bool cluster_of(const cudaLaunchConfig_t* config, const void* func, unsigned* cluster,
                bool* cooperative) {
  *cluster = 0;
  *cooperative = false;
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    const cudaLaunchAttribute& a = config->attrs[i];
    if (a.id == cudaLaunchAttributeCooperative) {
      *cooperative = a.val.cooperative != 0;
      continue;
    }
    if (a.id != cudaLaunchAttributeClusterDimension) return false;  // nothing else is modelled
    if (a.val.clusterDim.y != 1 || a.val.clusterDim.z != 1 || a.val.clusterDim.x == 0)
      return false;
    *cluster = a.val.clusterDim.x;
  }
  auto np = non_portable_clusters().find(func);
  const unsigned limit = np != non_portable_clusters().end() && np->second ? 16 : 8;
  return *cluster <= limit && (*cluster == 0 || config->gridDim.x % *cluster == 0);
}

}  // namespace
}  // namespace cudasim

cudaError_t cudaLaunchCooperativeKernel(const void* func, dim3 grid, dim3 block, void** args,
                                        size_t smem, cudaStream_t stream) {
  return cudasim::run_launch(func, grid, block, args, smem, /*cooperative=*/true, 0, stream);
}

cudaError_t cudaLaunchKernelExC(const cudaLaunchConfig_t* config, const void* func,
                                void** args) {
  unsigned cluster = 0;
  bool cooperative = false;
  if (!cudasim::cluster_of(config, func, &cluster, &cooperative))
    return cudasim::t_last_error = cudaErrorInvalidValue;
  if (cluster > 0 && (cudasim::g_refuse & cudasim::kRefuseClusterLaunches))
    return cudasim::failed(cooperative ? cudaErrorCooperativeLaunchTooLarge
                                       : cudaErrorClusterOutOfResources);
  const cudaError_t e = cudasim::run_launch(func, config->gridDim, config->blockDim, args,
                                            config->dynamicSmemBytes, cooperative, cluster,
                                            config->stream);
  // A launch that ran and failed inside (a broken rule, not a refusal before it ran) returns
  // success, as on a GPU, where a kernel's own failure comes back only at a later
  // synchronization: the launcher would take an error here for a refusal and rerun the plan
  // as a plain grid, hiding the failure. sim_api's entry points report it (kernel_failure).
  if (e == cudaErrorLaunchFailure) {
    cudasim::g_kernel_failure = cudasim::g_last_message;
    cudasim::t_last_error = cudaSuccess;
    return cudaSuccess;
  }
  return e;
}

cudaError_t cudaOccupancyMaxActiveClusters(int* clusters, const void* func,
                                           const cudaLaunchConfig_t* config) {
  if (cudasim::t_device != 0) return cudasim::failed(cudaErrorInvalidDevice);
  unsigned cluster = 0;
  bool cooperative = false;
  if (!cudasim::cluster_of(config, func, &cluster, &cooperative) || cluster == 0 ||
      (cudasim::g_refuse & cudasim::kRefuseClusterOccupancy))
    return cudasim::failed(cudaErrorInvalidValue);
  if (g_config.max_clusters >= 0) {
    *clusters = g_config.max_clusters;
    return cudaSuccess;
  }
  int per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessorImpl(&per_sm, func, (int)config->blockDim.x,
                                                    config->dynamicSmemBytes);
  *clusters = per_sm * g_config.sms / static_cast<int>(cluster);
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = cudasim::t_last_error;
  cudasim::t_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return cudasim::t_last_error; }

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return cudasim::failed(cudaErrorInvalidValue);
  *prop = cudaDeviceProp{};
  std::snprintf(prop->name, sizeof prop->name, "cudasim");
  prop->multiProcessorCount = g_config.sms;
  prop->sharedMemPerBlockOptin = static_cast<size_t>(g_config.smem_optin);
  prop->major = 9;
  prop->minor = 0;
  return cudaSuccess;
}

cudaError_t cudaMallocBytes(void** p, size_t bytes) {
  *p = std::malloc(std::max<size_t>(bytes, 1));
  return *p ? cudaSuccess : cudaErrorInvalidValue;
}

cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}

cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  (void)kind;
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}

// A kernel's own failure from an earlier cudaLaunchKernelExC, as a synchronization reports it.
static cudaError_t pending_kernel_failure() {
  std::string f = cudasim::kernel_failure();
  if (f.empty()) return cudaSuccess;
  cudasim::g_last_message = f;
  return cudasim::t_last_error = cudaErrorLaunchFailure;
}

cudaError_t cudaDeviceSynchronize() { return pending_kernel_failure(); }

const char* cudaGetErrorString(cudaError_t err) {
  if (err == cudaErrorLaunchFailure && !cudasim::g_last_message.empty())
    return cudasim::g_last_message.c_str();
  return cudaGetErrorName(err);
}

struct CUevent_st {
  long long tick = 0;
};

cudaError_t cudaEventCreate(cudaEvent_t* event) {
  *event = new CUevent_st;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  (void)stream;
  event->tick = cudasim::tick();
  return cudaSuccess;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  (void)event;
  return pending_kernel_failure();
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  *ms = static_cast<float>(end->tick - start->tick);
  return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  delete event;
  return cudaSuccess;
}

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorCooperativeLaunchTooLarge: return "cudaErrorCooperativeLaunchTooLarge";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorClusterOutOfResources: return "cudaErrorClusterOutOfResources";
  }
  return "cudaErrorUnknown";
}
