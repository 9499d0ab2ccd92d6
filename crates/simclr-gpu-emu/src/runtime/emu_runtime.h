// The CUDA device-side environment for the host C++ compiler (C++17, g++ or clang on x86-64).
//
// compile.rs preprocesses a module with this header -include'd, rewrites the marker tokens the
// CUDA keywords below expand to (__emu_global__, __emu_launch_bounds__, __emu_shared__) and the
// inline `asm` statements, appends a registration block and compiles the result to a shared
// object exporting emu_kernel_names / emu_kernel_info / emu_launch (docs: emu-contract.md).
//
// Execution model: each CUDA thread of a block is a fiber (a user-space context with its own
// stack); all of a block's fibers run on the calling host thread and switch only at
// synchronisation points (__syncthreads, warp collectives, mma.sync...). Blocks run one after
// another. Nothing here is concurrent, except atomics on global memory, which use real host
// atomics because two modules may be launched from two host threads at once.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdarg>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <new>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>
#include <type_traits>
#include <utility>

#include <sys/mman.h>
#include <unistd.h>

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define EMU_TSAN 1
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#include <sanitizer/asan_interface.h>
#define EMU_ASAN 1
#endif

#ifndef EMU_FTZ
#define EMU_FTZ 0
#endif

#define EMU_HIDDEN __attribute__((visibility("hidden")))
// The runtime's own bookkeeping is handed from fiber to fiber at switches TSan is told not to
// synchronise (so that kernel races stay visible); under TSan it is therefore not instrumented.
// Kernel-visible hand-offs (barriers, collectives, block start/end) are explicit
// __tsan_release/__tsan_acquire pairs.
#if defined(__SANITIZE_THREAD__)
#define EMU_RT __attribute__((no_sanitize("thread"), noinline))
#else
#define EMU_RT
#endif

// ---------------------------------------------------------------------------------------------
// CUDA keywords. The first three expand to markers that compile.rs consumes after
// preprocessing (so kernels stamped out by macros are found too).
#define __global__ __emu_global__
#define __launch_bounds__(...) __emu_launch_bounds__(__VA_ARGS__)
#define __shared__ __emu_shared__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline __attribute__((always_inline))
// Defined after the standard headers: libstdc++ itself spells __attribute__((__noinline__)).
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __CUDACC__ 1
#define __CUDA_ARCH__ 900
#define __NVCC__ 1
#define __CUDACC_RTC__ 1

// ---------------------------------------------------------------------------------------------
// Vector types (CUDA Programming Guide, "Built-in Vector Types": alignment as CUDA's headers).
#define EMU_VEC(N, T)                                                                              \
    struct N##1 { T x; };                                                                          \
    struct __attribute__((aligned(2 * sizeof(T)))) N##2 { T x, y; };                               \
    struct N##3 { T x, y, z; };                                                                    \
    struct __attribute__((aligned(4 * sizeof(T) > 16 ? 16 : 4 * sizeof(T)))) N##4 { T x, y, z, w; }; \
    static inline N##1 make_##N##1(T x) { return N##1{x}; }                                        \
    static inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }                                \
    static inline N##3 make_##N##3(T x, T y, T z) { return N##3{x, y, z}; }                        \
    static inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }
EMU_VEC(char, signed char)
EMU_VEC(uchar, unsigned char)
EMU_VEC(short, short)
EMU_VEC(ushort, unsigned short)
EMU_VEC(int, int)
EMU_VEC(uint, unsigned int)
EMU_VEC(long, long)
EMU_VEC(ulong, unsigned long)
EMU_VEC(longlong, long long)
EMU_VEC(ulonglong, unsigned long long)
EMU_VEC(float, float)
EMU_VEC(double, double)
#undef EMU_VEC

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

// The built-in variables. They are plain globals that the scheduler rewrites before switching
// to a fiber: the switch is an opaque call, so the compiler reloads them after every sync point.
extern "C++" EMU_HIDDEN uint3 threadIdx;
extern "C++" EMU_HIDDEN uint3 blockIdx;
extern "C++" EMU_HIDDEN dim3 blockDim;
extern "C++" EMU_HIDDEN dim3 gridDim;
EMU_HIDDEN uint3 threadIdx;
EMU_HIDDEN uint3 blockIdx;
EMU_HIDDEN dim3 blockDim;
EMU_HIDDEN dim3 gridDim;
static constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// Fibers and the launch state.

// A hand-written context switch: callee-saved registers on the old stack, stack pointers swapped.
// glibc's swapcontext makes a sigprocmask system call per switch; this does not. MXCSR and the
// x87 control word are shared by every fiber of a launch (set once per launch), so not saved.
extern "C" EMU_HIDDEN void __emu_ctx_switch(void** save_sp, void* new_sp);
__asm__(R"(
    .text
    .p2align 4
    .globl __emu_ctx_switch
    .hidden __emu_ctx_switch
    .type __emu_ctx_switch, @function
__emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size __emu_ctx_switch, .-__emu_ctx_switch
)");

// EMU_PENDING: not started, left to the block's runner (see __emu_run_block).
enum EmuState : int { EMU_READY = 0, EMU_AT_BARRIER = 1, EMU_AT_COLLECTIVE = 2, EMU_EXITED = 3, EMU_PENDING = 4 };

struct EmuGroup;

struct EmuFiber {
    void* sp = nullptr;
    char* stack = nullptr;  // lowest usable byte (a guard page lies below)
    size_t stack_size = 0;
    uint3 tid{};
    unsigned linear = 0;
    int state = EMU_EXITED;
    const char* where_file = "";
    int where_line = 0;
    const char* where_what = "";
    int bar_pred = 0;
    int bar_result = 0;
    int bar_total = 0;
    EmuGroup* group = nullptr;
    void* sync_obj = nullptr;
    bool from_runner = false;  // started on the runner's stack, which it now owns
#ifdef EMU_TSAN
    void* tsan_fiber = nullptr;
#endif
#ifdef EMU_ASAN
    void* asan_fake = nullptr;
#endif
};

// One warp collective in progress: the lanes of `mask` that have arrived so far.
struct EmuGroup {
    unsigned mask = 0, arrived = 0;
    const char* what = "";
    unsigned gen = 0;  // completions of this slot: TSan sync objects alternate by its parity
    char tsan_sync[2];
    const void* ins[32];
    void* outs[32];
};

struct EmuWarp {
    EmuGroup groups[32];
    unsigned used_bits = 0;  // the groups in use, so that exits and block starts scan none
    unsigned exited = 0;  // lanes that have exited
    unsigned exist = 0;   // lanes that exist in this block
};

typedef void (*EmuEntry)(void**);

enum EmuPolicy : int { EMU_ALTERNATE, EMU_FORWARD, EMU_REVERSE, EMU_RANDOM };

struct EmuLaunch {
    EmuFiber* fibers = nullptr;  // capacity `cap`, reused from launch to launch
    unsigned cap = 0;
    EmuWarp* warps = nullptr;
    unsigned warp_cap = 0;
    unsigned* order = nullptr;  // scratch for the random schedule
    unsigned n = 0;      // threads per block
    unsigned dyn = 0;    // dynamic shared bytes of the launch
    unsigned live = 0;   // threads of the block not exited
    unsigned at_bar = 0; // threads waiting at the block barrier
    int bar_count = 0;   // predicates summed for __syncthreads_count/and/or
    int cur = -1;        // the running fiber, -1: the scheduler
    // The runner runs a block's threads one after another on its own stack, with no switch
    // per thread; the thread it runs (direct_i) becomes a fiber of its own at its first wait.
    EmuFiber runner;
    int direct_i = -1;
    bool descending = false;
    bool promoted = false;
    void* sched_sp = nullptr;
    EmuEntry entry = nullptr;
    void** params = nullptr;
    const struct EmuSharedVar* shared_vars = nullptr;  // the kernel's static shared variables
    bool failed = false;
    char msg[1024];
    EmuPolicy policy = EMU_ALTERNATE;
    unsigned long long rng = 0;
    unsigned long long block_linear = 0;
    // TSan sync objects: scheduler to fibers at a block's start, fibers to the scheduler at
    // their exit, and the barrier's (alternating by generation, so that a thread already past
    // the next barrier does not pass its later writes to one not yet resumed from this one).
    char tsan_start, tsan_end;
    char tsan_bar[2];
    unsigned bar_gen = 0;
#ifdef EMU_TSAN
    void* tsan_sched = nullptr;
#endif
#ifdef EMU_ASAN
    const void* sched_stack_bottom = nullptr;
    size_t sched_stack_size = 0;
#endif
};

EMU_HIDDEN EmuLaunch __emu_L;

#if defined(EMU_ASAN) || defined(EMU_TSAN)
static constexpr size_t EMU_STACK = 512 * 1024;
#else
static constexpr size_t EMU_STACK = 128 * 1024;
#endif

EMU_RT static inline EmuFiber* __emu_cur() { return &__emu_L.fibers[__emu_L.cur]; }

// Records the launch's first error; the scheduler ends the launch when control comes back.
static void __emu_fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
EMU_RT static void __emu_fail(const char* fmt, ...) {
    if (__emu_L.failed) return;
    __emu_L.failed = true;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(__emu_L.msg, sizeof __emu_L.msg, fmt, ap);
    va_end(ap);
}

// Switch from the running fiber to the scheduler (the fiber stays in whatever state it set).
EMU_RT static void __emu_to_scheduler(bool exiting = false) {
    EmuFiber* f = __emu_cur();
    if (__emu_L.direct_i == __emu_L.cur && !exiting) {
        // A thread the runner started waits: it keeps the runner's stack, where its frames are,
        // and the runner takes the thread's unused one. The scheduler starts the rest as fibers.
        EmuFiber& r = __emu_L.runner;
        std::swap(f->stack, r.stack);
        std::swap(f->stack_size, r.stack_size);
        f->from_runner = true;
        __emu_L.direct_i = -1;
        __emu_L.promoted = true;
    }
#ifdef EMU_TSAN
    __tsan_switch_to_fiber(__emu_L.tsan_sched, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef EMU_ASAN
    __sanitizer_start_switch_fiber(exiting ? nullptr : &f->asan_fake, __emu_L.sched_stack_bottom,
                                   __emu_L.sched_stack_size);
#else
    (void)exiting;
#endif
    __emu_ctx_switch(&f->sp, __emu_L.sched_sp);
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(f->asan_fake, nullptr, nullptr);
#endif
}

[[noreturn]] EMU_RT static void __emu_trap_at(const char* why, const char* file, int line) {
    if (__emu_L.cur < 0) {
        fprintf(stderr, "simclr-gpu-emu: trap outside a kernel: %s\n", why);
        abort();
    }
    EmuFiber* f = __emu_cur();
    __emu_fail("trap in block (%u,%u,%u) thread (%u,%u,%u) at %s:%d: %s", blockIdx.x, blockIdx.y,
               blockIdx.z, f->tid.x, f->tid.y, f->tid.z, file, line, why);
    f->state = EMU_EXITED;  // never resumed: the launch ends
    __emu_to_scheduler(true);
    __builtin_unreachable();
}

// Ends the launch with CUDA_ERROR_LAUNCH_FAILED.
[[noreturn]] EMU_RT EMU_HIDDEN void __emu_trap(const char* why) { __emu_trap_at(why, "?", 0); }
[[noreturn]] static inline void __trap(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    __emu_trap_at("__trap()", file, line);
}
[[noreturn]] static inline void __brkpt(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    __emu_trap_at("__brkpt()", file, line);
}
[[noreturn]] static void __emu_assert_fail(const char* expr, const char* file, int line) {
    char buf[512];
    snprintf(buf, sizeof buf, "assertion `%s` failed", expr);
    __emu_trap_at(buf, file, line);
}

// threads linearised x, then y, then z; lane = linear % 32 (CUDA Programming Guide, "Thread
// Hierarchy" and "Warps": a warp is 32 consecutive linear thread ids).
EMU_RT EMU_HIDDEN unsigned __emu_lane_id() { return __emu_cur()->linear & 31u; }

EMU_RT static void __emu_release_barrier() {
    EmuLaunch& L = __emu_L;
    int total = (int)L.at_bar;
    for (unsigned i = 0; i < L.n; i++) {
        EmuFiber& f = L.fibers[i];
        if (f.state == EMU_AT_BARRIER) {
            f.state = EMU_READY;
            f.bar_result = L.bar_count;
            f.bar_total = total;
        }
    }
    L.at_bar = 0;
    L.bar_count = 0;
    L.bar_gen++;
}

// __syncthreads (CUDA Programming Guide, "Synchronization Functions"): waits until every thread
// of the block has reached it. Threads that have exited no longer count (arrive-and-drop, as the
// hardware's barrier counts only non-exited threads since Volta).
EMU_RT static int __emu_barrier(int pred, const char* file, int line, const char* what) {
    EmuLaunch& L = __emu_L;
    if (L.cur < 0) return pred;
    EmuFiber* f = __emu_cur();
    void* so = &L.tsan_bar[L.bar_gen & 1];
#ifdef EMU_TSAN
    __tsan_release(so);
#endif
    f->where_file = file;
    f->where_line = line;
    f->where_what = what;
    L.bar_count += pred != 0;
    L.at_bar++;
    f->state = EMU_AT_BARRIER;
    if (L.at_bar == L.live) {
        __emu_release_barrier();
    } else {
        __emu_to_scheduler();
    }
#ifdef EMU_TSAN
    __tsan_acquire(so);
#else
    (void)so;
#endif
    return f->bar_result;
}

static inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    __emu_barrier(0, file, line, "__syncthreads");
}
static inline int __syncthreads_count(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return __emu_barrier(p, file, line, "__syncthreads_count");
}
static inline int __syncthreads_and(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    int c = __emu_barrier(p, file, line, "__syncthreads_and");
    return __emu_L.cur < 0 ? p != 0 : c == __emu_cur()->bar_total;
}
static inline int __syncthreads_or(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return __emu_barrier(p, file, line, "__syncthreads_or") != 0;
}

// ---------------------------------------------------------------------------------------------
// Warp collectives (CUDA Programming Guide, "Warp Shuffle Functions", "Warp Vote Functions",
// "__syncwarp"): every non-exited lane named in `mask` must execute the same intrinsic with the
// same mask; the emulator checks that and makes any violation a launch failure, not UB.
EMU_RT static void __emu_collective_at(unsigned mask, const void* in, void* out,
                                void (*compute)(const void* const*, void* const*, unsigned, void*), void* ctx,
                                const char* what, const char* file, int line) {
    EmuLaunch& L = __emu_L;
    EmuFiber* f = __emu_cur();
    unsigned lane = f->linear & 31u, w = f->linear >> 5;
    EmuWarp& W = L.warps[w];
    unsigned bit = 1u << lane;
    auto fail_here = [&](const char* why, unsigned m2, const char* what2) {
        char buf[400];
        snprintf(buf, sizeof buf, "%s with mask 0x%08x in warp %u: %s (other: %s, mask 0x%08x)", what, mask, w, why,
                 what2, m2);
        __emu_trap_at(buf, file, line);
    };
    if (!(mask & bit)) fail_here("the mask does not name the calling lane", mask, what);
    if (mask & ~W.exist) fail_here("the mask names a lane that does not exist in this block", W.exist, "lanes present");
    if (mask & W.exited) fail_here("the mask names a lane that has exited", W.exited, "exited lanes");
    EmuGroup* g = nullptr;
    for (unsigned bits = W.used_bits; bits; bits &= bits - 1) {
        EmuGroup& c = W.groups[__builtin_ctz(bits)];
        if (c.mask & mask) {
            if (c.mask != mask || strcmp(c.what, what) != 0)
                fail_here("lanes of the warp are at different collectives", c.mask, c.what);
            g = &c;
            break;
        }
    }
    if (!g) {
        // At most 32 groups: each names a calling lane, and a lane waits at one at a time.
        unsigned slot = (unsigned)__builtin_ctz(~W.used_bits);
        W.used_bits |= 1u << slot;
        g = &W.groups[slot];
        g->mask = mask;
        g->arrived = 0;
        g->what = what;
        for (int i = 0; i < 32; i++) g->ins[i] = nullptr, g->outs[i] = nullptr;
    }
    g->ins[lane] = in;
    g->outs[lane] = out;
    g->arrived |= bit;
    f->where_file = file;
    f->where_line = line;
    f->where_what = what;
    void* so = &g->tsan_sync[g->gen & 1];
#ifdef EMU_TSAN
    __tsan_release(so);
#endif
    if (g->arrived == mask) {
#ifdef EMU_TSAN
        __tsan_acquire(so);  // the other lanes' inputs
#endif
        compute(g->ins, g->outs, mask, ctx);
#ifdef EMU_TSAN
        __tsan_release(so);  // their outputs, acquired when they resume
#endif
        g->gen++;
        unsigned base = w * 32;
        for (unsigned l = 0; l < 32; l++)
            if ((mask >> l & 1u) && l != lane) {
                L.fibers[base + l].state = EMU_READY;
                L.fibers[base + l].group = nullptr;
            }
        W.used_bits &= ~(1u << (unsigned)(g - W.groups));
    } else {
        f->state = EMU_AT_COLLECTIVE;
        f->group = g;
        __emu_to_scheduler();
    }
#ifdef EMU_TSAN
    __tsan_acquire(so);
#else
    (void)so;
#endif
}

// Every lane of `mask` calls this with its own input; the last to arrive runs compute once with
// every lane's in/out buffers (null outside mask, `ctx` of that last lane); then all return.
EMU_RT EMU_HIDDEN void __emu_warp_collective(unsigned mask, const void* in, void* out,
                                      void (*compute)(const void* const* ins, void* const* outs, unsigned mask,
                                                      void* ctx),
                                      void* ctx, const char* what) {
    __emu_collective_at(mask, in, out, compute, ctx, what, "?", 0);
}

static void __emu_noop_compute(const void* const*, void* const*, unsigned, void*) {}

static inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    __emu_collective_at(mask, nullptr, nullptr, __emu_noop_compute, nullptr, "__syncwarp", file, line);
}

struct EmuShflIn {
    unsigned long long v;
    int arg;
    int width;
};
enum EmuShflMode : int { EMU_SHFL_IDX, EMU_SHFL_UP, EMU_SHFL_DOWN, EMU_SHFL_XOR };

// The source lane per CUDA Programming Guide, "Warp Shuffle Functions": lanes are split into
// sub-sections of `width`; a source outside the caller's sub-section (up/down) or in a later one
// (xor) returns the caller's own value. A source lane outside mask is undefined on the GPU; the
// emulator returns the caller's own value.
EMU_RT static void __emu_shfl_compute(const void* const* ins, void* const* outs, unsigned mask, void* ctx) {
    int mode = (int)(intptr_t)ctx;
    for (int l = 0; l < 32; l++) {
        if (!(mask >> l & 1u)) continue;
        const EmuShflIn* me = (const EmuShflIn*)ins[l];
        int w = me->width;
        int base = l & ~(w - 1);
        int src = l;
        switch (mode) {
        case EMU_SHFL_IDX: src = base + (me->arg & (w - 1)); break;
        case EMU_SHFL_UP: src = (l - base) - me->arg >= 0 ? l - me->arg : l; break;
        case EMU_SHFL_DOWN: src = (l - base) + me->arg < w ? l + me->arg : l; break;
        default: src = l ^ me->arg; if (src >= base + w) src = l; break;
        }
        if (src < 0 || src > 31 || !(mask >> src & 1u)) src = l;
        *(unsigned long long*)outs[l] = ((const EmuShflIn*)ins[src])->v;
    }
}

static const char* const __emu_shfl_names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync",
                                               "__shfl_xor_sync"};

template <class T>
static inline T __emu_shfl(int mode, unsigned mask, T var, int arg, int width, const char* file, int line) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of an 8-byte or smaller value");
    if (width <= 0 || width > 32 || (width & (width - 1))) __emu_trap_at("shuffle width not a power of 2 <= 32", file, line);
    EmuShflIn in{0, arg, width};
    memcpy(&in.v, &var, sizeof(T));
    unsigned long long out = 0;
    __emu_collective_at(mask, &in, &out, __emu_shfl_compute, (void*)(intptr_t)mode, __emu_shfl_names[mode], file, line);
    T r;
    memcpy(&r, &out, sizeof(T));
    return r;
}

#define EMU_SHFL_FN(NAME, MODE, ARG)                                                                               \
    template <class T, class = std::enable_if_t<std::is_arithmetic<T>::value>>                                    \
    static inline T NAME(unsigned mask, T var, ARG a, int width = warpSize, const char* file = __builtin_FILE(),    \
                         int line = __builtin_LINE()) {                                                            \
        return __emu_shfl<T>(MODE, mask, var, (int)a, width, file, line);                                          \
    }
EMU_SHFL_FN(__shfl_sync, EMU_SHFL_IDX, int)
EMU_SHFL_FN(__shfl_up_sync, EMU_SHFL_UP, unsigned)
EMU_SHFL_FN(__shfl_down_sync, EMU_SHFL_DOWN, unsigned)
EMU_SHFL_FN(__shfl_xor_sync, EMU_SHFL_XOR, int)
#undef EMU_SHFL_FN

EMU_RT static void __emu_ballot_compute(const void* const* ins, void* const* outs, unsigned mask, void*) {
    unsigned b = 0;
    for (int l = 0; l < 32; l++)
        if ((mask >> l & 1u) && *(const int*)ins[l]) b |= 1u << l;
    for (int l = 0; l < 32; l++)
        if (mask >> l & 1u) *(unsigned*)outs[l] = b;
}
static inline unsigned __emu_vote(const char* what, unsigned mask, int pred, const char* file, int line) {
    int p = pred != 0;
    unsigned out = 0;
    __emu_collective_at(mask, &p, &out, __emu_ballot_compute, nullptr, what, file, line);
    return out;
}
static inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                                     int line = __builtin_LINE()) {
    return __emu_vote("__ballot_sync", mask, pred, file, line);
}
static inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return __emu_vote("__any_sync", mask, pred, file, line) != 0;
}
static inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return __emu_vote("__all_sync", mask, pred, file, line) == mask;
}
static inline unsigned __uni_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                                  int line = __builtin_LINE()) {
    unsigned b = __emu_vote("__uni_sync", mask, pred, file, line);
    return b == 0 || b == mask;
}
// The GPU returns the lanes currently converged with the caller; the emulator has no notion of
// divergence and returns the warp's lanes that have not exited (a documented difference).
EMU_RT static inline unsigned __activemask() {
    EmuFiber* f = __emu_cur();
    EmuWarp& W = __emu_L.warps[f->linear >> 5];
    return W.exist & ~W.exited;
}
static inline unsigned __lanemask_lt() { return (1u << __emu_lane_id()) - 1u; }

// Memory fences: the fibers of a launch run on one host thread, and other launches touch other
// memory; a compiler barrier plus a host fence keeps the order.
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---------------------------------------------------------------------------------------------
// Atomics (CUDA Programming Guide, "Atomic Functions"): host atomics, since another module's
// launch may run on another host thread at the same time.
template <class T>
static inline T __emu_atomic_rmw(T* p, T (*op)(T, T), T v) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomic of 4 or 8 bytes");
    typedef std::conditional_t<sizeof(T) == 4, unsigned, unsigned long long> U;
    U* q = reinterpret_cast<U*>(p);
    U old = __atomic_load_n(q, __ATOMIC_RELAXED);
    for (;;) {
        T o;
        memcpy(&o, &old, sizeof o);
        T n = op(o, v);
        U nb;
        memcpy(&nb, &n, sizeof nb);
        if (__atomic_compare_exchange_n(q, &old, nb, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return o;
    }
}
#define EMU_ATOMIC_INT(T)                                                                                        \
    static inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }                 \
    static inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }                 \
    static inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }                 \
    static inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }                   \
    static inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }                 \
    static inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }               \
    static inline T atomicMax(T* p, T v) {                                                                      \
        return __emu_atomic_rmw<T>(p, [](T a, T b) { return a > b ? a : b; }, v);                                \
    }                                                                                                           \
    static inline T atomicMin(T* p, T v) {                                                                      \
        return __emu_atomic_rmw<T>(p, [](T a, T b) { return a < b ? a : b; }, v);                                \
    }                                                                                                           \
    static inline T atomicCAS(T* p, T cmp, T v) {                                                               \
        __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                      \
        return cmp;                                                                                             \
    }
EMU_ATOMIC_INT(int)
EMU_ATOMIC_INT(unsigned)
EMU_ATOMIC_INT(long long)
EMU_ATOMIC_INT(unsigned long long)
#undef EMU_ATOMIC_INT
static inline unsigned short atomicCAS(unsigned short* p, unsigned short cmp, unsigned short v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return cmp;
}
static inline float atomicAdd(float* p, float v) {
    return __emu_atomic_rmw<float>(p, [](float a, float b) { return a + b; }, v);
}
static inline double atomicAdd(double* p, double v) {
    return __emu_atomic_rmw<double>(p, [](double a, double b) { return a + b; }, v);
}
static inline float atomicExch(float* p, float v) {
    return __emu_atomic_rmw<float>(p, [](float, float b) { return b; }, v);
}
static inline float atomicMax(float* p, float v) {
    return __emu_atomic_rmw<float>(p, [](float a, float b) { return fmaxf(a, b); }, v);
}
static inline float atomicMin(float* p, float v) {
    return __emu_atomic_rmw<float>(p, [](float a, float b) { return fminf(a, b); }, v);
}
static inline unsigned atomicInc(unsigned* p, unsigned v) {
    return __emu_atomic_rmw<unsigned>(p, [](unsigned o, unsigned m) { return o >= m ? 0u : o + 1u; }, v);
}
static inline unsigned atomicDec(unsigned* p, unsigned v) {
    return __emu_atomic_rmw<unsigned>(p, [](unsigned o, unsigned m) { return (o == 0u || o > m) ? m : o - 1u; }, v);
}
#define EMU_ATOMIC_SCOPED(F)                                                                 \
    template <class... A> static inline auto F##_block(A... a) { return F(a...); }          \
    template <class... A> static inline auto F##_system(A... a) { return F(a...); }
EMU_ATOMIC_SCOPED(atomicAdd)
EMU_ATOMIC_SCOPED(atomicCAS)
EMU_ATOMIC_SCOPED(atomicExch)
EMU_ATOMIC_SCOPED(atomicMax)
EMU_ATOMIC_SCOPED(atomicMin)
#undef EMU_ATOMIC_SCOPED

// ---------------------------------------------------------------------------------------------
// Bit reinterpretation, conversions and integer intrinsics (CUDA Math API, "Type Casting
// Intrinsics", "Integer Intrinsics").
template <class To, class From>
static inline To __emu_bits(From f) {
    static_assert(sizeof(To) == sizeof(From), "same size");
    To t;
    memcpy(&t, &f, sizeof t);
    return t;
}
static inline float __int_as_float(int x) { return __emu_bits<float>(x); }
static inline int __float_as_int(float x) { return __emu_bits<int>(x); }
static inline float __uint_as_float(unsigned x) { return __emu_bits<float>(x); }
static inline unsigned __float_as_uint(float x) { return __emu_bits<unsigned>(x); }
static inline double __longlong_as_double(long long x) { return __emu_bits<double>(x); }
static inline long long __double_as_longlong(double x) { return __emu_bits<long long>(x); }
static inline int __double2hiint(double x) { return (int)(__emu_bits<unsigned long long>(x) >> 32); }
static inline int __double2loint(double x) { return (int)__emu_bits<unsigned long long>(x); }
static inline double __hiloint2double(int hi, int lo) {
    return __emu_bits<double>(((unsigned long long)(unsigned)hi << 32) | (unsigned)lo);
}

// Float to integer: the GPU saturates out-of-range values and maps NaN to 0.
template <class I>
static inline I __emu_f2i(double r) {
    if (r != r) return 0;
    if (r <= (double)std::numeric_limits<I>::min()) return std::numeric_limits<I>::min();
    if (r >= (double)std::numeric_limits<I>::max()) return std::numeric_limits<I>::max();
    return (I)r;
}
static inline int __float2int_rn(float x) { return __emu_f2i<int>(nearbyint((double)x)); }
static inline int __float2int_rz(float x) { return __emu_f2i<int>(trunc((double)x)); }
static inline int __float2int_rd(float x) { return __emu_f2i<int>(floor((double)x)); }
static inline int __float2int_ru(float x) { return __emu_f2i<int>(ceil((double)x)); }
static inline unsigned __float2uint_rn(float x) { return __emu_f2i<unsigned>(nearbyint((double)x)); }
static inline unsigned __float2uint_rz(float x) { return __emu_f2i<unsigned>(trunc((double)x)); }
static inline unsigned __float2uint_rd(float x) { return __emu_f2i<unsigned>(floor((double)x)); }
static inline unsigned __float2uint_ru(float x) { return __emu_f2i<unsigned>(ceil((double)x)); }
static inline long long __float2ll_rn(float x) { return __emu_f2i<long long>(nearbyint((double)x)); }
static inline long long __float2ll_rz(float x) { return __emu_f2i<long long>(trunc((double)x)); }
static inline int __double2int_rn(double x) { return __emu_f2i<int>(nearbyint(x)); }
static inline int __double2int_rz(double x) { return __emu_f2i<int>(trunc(x)); }
static inline float __int2float_rn(int x) { return (float)x; }
static inline float __uint2float_rn(unsigned x) { return (float)x; }
static inline float __ll2float_rn(long long x) { return (float)x; }
static inline double __int2double_rn(int x) { return (double)x; }
static inline float __double2float_rn(double x) { return (float)x; }
static inline float __double2float_rz(double x) {
    float f = (float)x;
    if (std::fabs((double)f) > std::fabs(x)) f = std::nextafter(f, 0.0f);
    return f;
}

static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
static inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
static inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
    return (x >> 16) | (x << 16);
}
static inline unsigned long long __brevll(unsigned long long x) {
    return ((unsigned long long)__brev((unsigned)x) << 32) | __brev((unsigned)(x >> 32));
}
static inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    unsigned long long v = ((unsigned long long)y << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; i++) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
    return r;
}
static inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
static inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
static inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
static inline int __mul24(int a, int b) { return ((a << 8) >> 8) * ((b << 8) >> 8); }
static inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
static inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
    unsigned long long v = ((unsigned long long)hi << 32) | lo;
    return (unsigned)((v << (s & 31)) >> 32);
}
static inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
    unsigned long long v = ((unsigned long long)hi << 32) | lo;
    return (unsigned)(v >> (s & 31));
}
static inline int __sad(int a, int b, unsigned c) { return (int)(c + (unsigned)(a > b ? a - b : b - a)); }
static inline unsigned __usad(unsigned a, unsigned b, unsigned c) { return c + (a > b ? a - b : b - a); }
static inline int __hadd(int a, int b) { return (int)(((long long)a + b) >> 1); }
static inline int __rhadd(int a, int b) { return (int)(((long long)a + b + 1) >> 1); }
static inline unsigned __uhadd(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a + b) >> 1); }

// ---------------------------------------------------------------------------------------------
// Math. The CUDA math API's names (expf, logf, fmaxf, sqrt...) are <cmath>'s. The fast-math
// intrinsics use host libm here, while the GPU's __expf, __logf, __sinf... are approximations
// (CUDA Math API, "Intrinsic Functions": errors of a few ulp or more): a known difference, so
// results of kernels using them differ from the GPU's in the last bits.
// glibc declares these names (its own aliases of expf...), so they are macros here.
#define __expf(x) (::expf(x))
#define __exp10f(x) (::exp10f(x))
#define __logf(x) (::logf(x))
#define __log2f(x) (::log2f(x))
#define __log10f(x) (::log10f(x))
#define __powf(x, y) (::powf((x), (y)))
#define __sinf(x) (::sinf(x))
#define __cosf(x) (::cosf(x))
#define __tanf(x) (::tanf(x))
#define __sincosf(x, s, c) (::sincosf((x), (s), (c)))
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline double __dsqrt_rn(double x) { return sqrt(x); }
static inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
static inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
static inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
static inline float saturatef(float x) { return __saturatef(x); }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline float sinpif(float x) { return sinf((float)M_PI * x); }
static inline float cospif(float x) { return cosf((float)M_PI * x); }
static inline double sinpi(double x) { return sin(M_PI * x); }
static inline double cospi(double x) { return cos(M_PI * x); }
static inline float normcdff(float x) { return 0.5f * erfcf(-x * (float)M_SQRT1_2); }
static inline double normcdf(double x) { return 0.5 * erfc(-x * M_SQRT1_2); }

// CUDA's min/max: overloads for every arithmetic pair, the result in the usual arithmetic
// conversion of the two (CUDA Math API, "Integer Mathematical Functions" / math_functions.hpp).
template <class A, class B, class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
static inline std::common_type_t<A, B> min(A a, B b) {
    typedef std::common_type_t<A, B> C;
    if constexpr (std::is_floating_point<C>::value) return std::fmin((C)a, (C)b);
    else return (C)a < (C)b ? (C)a : (C)b;
}
template <class A, class B, class = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
static inline std::common_type_t<A, B> max(A a, B b) {
    typedef std::common_type_t<A, B> C;
    if constexpr (std::is_floating_point<C>::value) return std::fmax((C)a, (C)b);
    else return (C)a > (C)b ? (C)a : (C)b;
}
static inline unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned umax(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long llmin(long long a, long long b) { return a < b ? a : b; }
static inline long long llmax(long long a, long long b) { return a > b ? a : b; }
static inline unsigned long long ullmin(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline unsigned long long ullmax(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

// Read-only cache loads: plain loads on the host.
template <class T>
static inline T __ldg(const T* p) { return *p; }
template <class T>
static inline T __ldcg(const T* p) { return *p; }
template <class T>
static inline T __ldcs(const T* p) { return *p; }
template <class T>
static inline T __ldlu(const T* p) { return *p; }
template <class T>
static inline T __ldcv(const T* p) { return *p; }
template <class T>
static inline void __stcg(T* p, T v) { *p = v; }
template <class T>
static inline void __stcs(T* p, T v) { *p = v; }
template <class T>
static inline void __stwt(T* p, T v) { *p = v; }

// Clocks: a monotonic host clock, in nanoseconds.
static inline long long clock64() { return (long long)__builtin_ia32_rdtsc(); }
static inline unsigned long long __globaltimer() { return __builtin_ia32_rdtsc(); }
static inline void __nanosleep(unsigned) {}

// ---------------------------------------------------------------------------------------------
// Shared memory. compile.rs turns each `__shared__` variable into a static in the section
// emu_shared (per block: the scheduler fills the section with 0xFF bytes at each block's start,
// so reading shared memory nobody wrote this block gives NaN / -1 patterns, as an uninitialised
// value would), and each `extern __shared__ T name[];` into a pointer to __emu_dyn_shared.
// (Statics of templates and inline functions are COMDAT, where the compiler drops the section
// attribute: compile.rs moves them into emu_shared in the assembly.)
extern "C" char __start_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_emu_shared[] __attribute__((weak, visibility("hidden")));
// The largest dynamic shared memory of a block the GPUs we target allow (227 KiB on sm_90).
static constexpr unsigned EMU_DYN_SHARED_MAX = 232448;
EMU_HIDDEN __attribute__((aligned(128), section(".bss.emu_dyn_shared"))) unsigned char __emu_dyn_shared[EMU_DYN_SHARED_MAX];

static inline unsigned long long __emu_static_shared_bytes() {
    return (__start_emu_shared && __stop_emu_shared) ? (unsigned long long)(__stop_emu_shared - __start_emu_shared) : 0;
}
// Each kernel's own static shared bytes, in the registration's order, ~0 where compile.rs did not
// find the kernel's code in the assembly (then the module's total is reported), and its static
// shared variables (a list ended by a null address; a null list where unknown: then the whole
// section is poisoned). Defined in the assembly compile.rs appends (see compile.rs, `shared`,
// for the rule). Poisoning each variable, not the section, keeps clear of AddressSanitizer's
// redzones between them.
struct EmuSharedVar {
    void* addr;
    unsigned long long size;
};
extern "C" EMU_HIDDEN const unsigned long long __emu_kernel_shared[];
extern "C" EMU_HIDDEN const EmuSharedVar* const __emu_kernel_shared_vars[];

// ---------------------------------------------------------------------------------------------
// Inline PTX: compile.rs rewrites each asm statement to __emu_asm("template", __emu_op(...)...).
struct EmuOperand {
    char mod;     // '=' or '+' for outputs, 0 for inputs
    char letter;  // the constraint letter: r, l, f, d, h, n, c
    void* ptr;    // the output's lvalue (outputs), else null
    unsigned long long bits;  // the input's value (for '+' outputs, the current value), zero-extended
};

template <class V>
static inline unsigned long long __emu_op_bits(char letter, V v) {
    if constexpr (std::is_pointer<V>::value) {
        return (unsigned long long)(uintptr_t)v;
    } else if constexpr (std::is_enum<V>::value) {
        return (unsigned long long)(long long)v;
    } else if constexpr (std::is_arithmetic<V>::value) {
        switch (letter) {
        case 'f': return __emu_bits<unsigned>((float)v);
        case 'd': return __emu_bits<unsigned long long>((double)v);
        case 'h': return (unsigned short)(long long)v;
        case 'c': return (unsigned char)(long long)v;
        case 'r': return std::is_floating_point<V>::value ? __emu_bits<unsigned>((float)v) : (unsigned)(long long)v;
        default:
            if constexpr (std::is_floating_point<V>::value) return __emu_bits<unsigned long long>((double)v);
            else return (unsigned long long)v;
        }
    } else {
        static_assert(sizeof(V) <= 8, "asm operand of at most 8 bytes");
        unsigned long long b = 0;
        memcpy(&b, &v, sizeof(V));
        return b;
    }
}

template <class V>
static inline EmuOperand __emu_op(int mod, char letter, V v) {
    EmuOperand o{(char)mod, letter, nullptr, 0};
    if constexpr (std::is_pointer<V>::value) {
        if (mod) {
            o.ptr = (void*)v;
            if (mod == '+') o.bits = __emu_op_bits(letter, *v);
            return o;
        }
    }
    o.bits = __emu_op_bits(letter, v);
    return o;
}

EMU_HIDDEN bool __emu_ptx_exec(const char* tmpl, EmuOperand* ops, int n);

template <class... O>
static inline void __emu_asm(const char* tmpl, O... ops) {
    EmuOperand a[sizeof...(O) + 1] = {ops..., EmuOperand{0, 0, nullptr, 0}};
    if (!__emu_ptx_exec(tmpl, a, (int)sizeof...(O))) {
        char buf[600];
        snprintf(buf, sizeof buf, "unsupported inline PTX: %s", tmpl);
        __emu_trap(buf);
    }
}

// ---------------------------------------------------------------------------------------------
// The scheduler.

static unsigned long long __emu_rand() {
    unsigned long long x = __emu_L.rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return __emu_L.rng = x;
}

// The bookkeeping of a thread whose kernel function has returned.
EMU_RT static void __emu_thread_exited(EmuFiber* f) {
    EmuLaunch& L = __emu_L;
    f->state = EMU_EXITED;
    L.live--;
    EmuWarp& W = L.warps[f->linear >> 5];
    unsigned bit = 1u << (f->linear & 31u);
    W.exited |= bit;
    // A lane that exits while named by a collective its warp-mates wait at: that collective can
    // never complete (on the GPU: undefined behaviour, usually a hang).
    for (unsigned bits = W.used_bits; bits; bits &= bits - 1) {
        EmuGroup& g = W.groups[__builtin_ctz(bits)];
        if ((g.mask & bit) && !(g.arrived & bit)) {
            char buf[300];
            snprintf(buf, sizeof buf, "thread exited while named by the mask 0x%08x of %s that its warp waits at",
                     g.mask, g.what);
            __emu_fail("launch failed in block (%u,%u,%u) thread (%u,%u,%u): %s", blockIdx.x, blockIdx.y,
                       blockIdx.z, f->tid.x, f->tid.y, f->tid.z, buf);
        }
    }
    if (L.at_bar > 0 && L.at_bar == L.live) __emu_release_barrier();
#ifdef EMU_TSAN
    __tsan_release(&L.tsan_end);
#endif
}

static void __emu_shuffle(unsigned* order, unsigned n) {
    for (unsigned i = 0; i < n; i++) order[i] = i;
    for (unsigned i = n; i > 1; i--) {
        unsigned j = (unsigned)(__emu_rand() % i);
        unsigned t = order[i - 1];
        order[i - 1] = order[j];
        order[j] = t;
    }
}

[[noreturn]] EMU_RT static void __emu_fiber_main() {
    EmuLaunch& L = __emu_L;
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &L.sched_stack_bottom, &L.sched_stack_size);
#endif
#ifdef EMU_TSAN
    __tsan_acquire(&L.tsan_start);
#endif
    L.entry(L.params);
    __emu_thread_exited(__emu_cur());
    __emu_to_scheduler(true);
    __builtin_unreachable();
}

// The order in which a block's threads first run: that of the scheduler's first pass.
EMU_RT static unsigned __emu_first_order(unsigned k) {
    EmuLaunch& L = __emu_L;
    return L.policy == EMU_RANDOM ? L.order[k] : L.descending ? L.n - 1 - k : k;
}

// Runs the block's threads in turn on the runner's stack, each to its end, until one waits (it
// then keeps this stack and finishes as a fiber: see __emu_to_scheduler) or all have exited.
// A thread that never waits runs exactly as it would on a fiber of its own.
[[noreturn]] EMU_RT static void __emu_runner_main() {
    EmuLaunch& L = __emu_L;
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &L.sched_stack_bottom, &L.sched_stack_size);
#endif
    for (unsigned k = 0; k < L.n && !L.failed; k++) {
        unsigned i = __emu_first_order(k);
        EmuFiber* f = &L.fibers[i];
        L.cur = (int)i;
        L.direct_i = (int)i;
        threadIdx = f->tid;
        f->state = EMU_READY;
        L.entry(L.params);
        f = &L.fibers[i];
        __emu_thread_exited(f);
        if (f->from_runner) break;  // this stack is now the thread's; the runner is done
    }
    L.direct_i = -1;
    void* abandoned;  // never resumed: each block starts the runner afresh
#ifdef EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, L.sched_stack_bottom, L.sched_stack_size);
#endif
    __emu_ctx_switch(&abandoned, L.sched_sp);
    __builtin_unreachable();
}

EMU_RT static void __emu_init_fiber(EmuFiber& f, void (*main)() = __emu_fiber_main) {
    if (!f.stack) {
        size_t page = (size_t)sysconf(_SC_PAGESIZE);
        void* m = mmap(nullptr, EMU_STACK + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (m == MAP_FAILED) {
            fprintf(stderr, "simclr-gpu-emu: cannot map a fiber stack\n");
            abort();
        }
        mprotect(m, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
        f.stack = (char*)m + page;
        f.stack_size = EMU_STACK;
#ifdef EMU_TSAN
        f.tsan_fiber = __tsan_create_fiber(0);
#endif
    }
    uintptr_t top = ((uintptr_t)f.stack + f.stack_size) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = nullptr;                          // fake return address of `main`
    *--sp = (void*)main;                      // __emu_ctx_switch's `ret` goes here
    for (int i = 0; i < 6; i++) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
    f.sp = sp;
#ifdef EMU_ASAN
    f.asan_fake = nullptr;
#endif
}

// Runs fiber `f` (a thread's, with L.cur and threadIdx set, or the runner) until it switches back.
EMU_RT static void __emu_switch_to(EmuFiber& f) {
    EmuLaunch& L = __emu_L;
#ifdef EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack, f.stack_size);
#endif
#ifdef EMU_TSAN
    __tsan_switch_to_fiber(f.tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
    __emu_ctx_switch(&L.sched_sp, f.sp);
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    L.cur = -1;
}

EMU_RT static void __emu_run_fiber(unsigned i) {
    EmuLaunch& L = __emu_L;
    L.cur = (int)i;
    threadIdx = L.fibers[i].tid;
    __emu_switch_to(L.fibers[i]);
}

EMU_RT static int __emu_fmt_where(char* out, size_t cap, int state) {
    EmuLaunch& L = __emu_L;
    size_t len = 0;
    int groups = 0;
    bool* done = (bool*)calloc(L.n, 1);
    for (unsigned i = 0; i < L.n && len + 200 < cap; i++) {
        EmuFiber& a = L.fibers[i];
        if (done[i] || a.state != state) continue;
        // Group the threads waiting at the same place; list them as ranges of linear ids.
        int w = snprintf(out + len, cap - len, "%s%s at %s:%d by threads", groups ? "; " : "", a.where_what,
                         a.where_file, a.where_line);
        len += (size_t)w;
        groups++;
        unsigned run_start = ~0u, prev = ~0u;
        for (unsigned j = i; j <= L.n; j++) {
            bool same = j < L.n && !done[j] && L.fibers[j].state == state && L.fibers[j].where_line == a.where_line &&
                        L.fibers[j].where_what == a.where_what && L.fibers[j].where_file == a.where_file;
            if (same) {
                done[j] = true;
                if (run_start == ~0u) run_start = j;
                prev = j;
            } else if (run_start != ~0u && (j == L.n || j != prev + 1 || !same)) {
                if (len + 40 < cap)
                    len += (size_t)(run_start == prev ? snprintf(out + len, cap - len, " %u", run_start)
                                                      : snprintf(out + len, cap - len, " %u-%u", run_start, prev));
                run_start = ~0u;
            }
        }
    }
    free(done);
    return groups;
}

// Runs one block to completion (or to the launch's first error).
EMU_RT static void __emu_run_block(bool descending) {
    EmuLaunch& L = __emu_L;
    const unsigned n = L.n;
    // TSan must see each thread on a fiber of its own, or races between them go unseen.
#ifdef EMU_TSAN
    const bool direct = false;
#else
    const bool direct = true;
#endif
    for (unsigned i = 0; i < n; i++) {
        EmuFiber& f = L.fibers[i];
        if (direct) {
            f.state = EMU_PENDING;
        } else {
            __emu_init_fiber(f);
            f.state = EMU_READY;
        }
        f.group = nullptr;
        f.bar_result = 0;
        f.from_runner = false;
    }
    for (unsigned w = 0; w < (n + 31) / 32; w++) {
        EmuWarp& W = L.warps[w];
        W.used_bits = 0;
        W.exited = 0;
        unsigned lanes = n - w * 32 >= 32 ? 32 : n - w * 32;
        W.exist = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
    }
    L.live = n;
    L.at_bar = 0;
    L.bar_count = 0;
    // Poison the block's shared memory (static and this launch's dynamic bytes).
    if (L.shared_vars) {
        for (const EmuSharedVar* v = L.shared_vars; v->addr; v++) memset(v->addr, 0xff, v->size);
    } else if (__start_emu_shared && __stop_emu_shared) {
        memset(__start_emu_shared, 0xff, __stop_emu_shared - __start_emu_shared);
    }
    memset(__emu_dyn_shared, 0xff, L.dyn);
#ifdef EMU_TSAN
    __tsan_release(&L.tsan_start);
#endif
    unsigned* order = L.order;
    L.descending = descending;
    if (direct) {
        if (L.policy == EMU_RANDOM) __emu_shuffle(order, n);
        L.promoted = false;
        __emu_init_fiber(L.runner, __emu_runner_main);
        __emu_switch_to(L.runner);
        if (L.failed) return;
        if (L.live == 0) return;
        // A thread waits: the ones the runner has not reached start as fibers.
        for (unsigned i = 0; i < n; i++) {
            EmuFiber& f = L.fibers[i];
            if (f.state != EMU_PENDING) continue;
            __emu_init_fiber(f);
            f.state = EMU_READY;
        }
    }
    for (;;) {
        if (L.policy == EMU_RANDOM) {
            __emu_shuffle(order, n);
        }
        bool progressed = false;
        for (unsigned k = 0; k < n; k++) {
            unsigned i = L.policy == EMU_RANDOM ? order[k] : descending ? n - 1 - k : k;
            if (L.fibers[i].state != EMU_READY) continue;
            __emu_run_fiber(i);
            progressed = true;
            if (L.failed) return;
        }
        if (L.live == 0) break;
        if (!progressed) {
            // Every live thread waits and nothing can release them: a deadlock (on the GPU, a
            // hang or undefined behaviour). Name where they wait.
            char where[700];
            int g = __emu_fmt_where(where, sizeof where, EMU_AT_BARRIER);
            char where2[700];
            int g2 = __emu_fmt_where(where2, sizeof where2, EMU_AT_COLLECTIVE);
            __emu_fail("deadlock in block (%u,%u,%u): %u live threads can never all meet: %s%s%s%s%s", blockIdx.x,
                       blockIdx.y, blockIdx.z, L.live, g ? "waiting at " : "", g ? where : "", g && g2 ? "; " : "",
                       g2 ? "waiting at warp collective " : "", g2 ? where2 : "");
            return;
        }
    }
#ifdef EMU_TSAN
    __tsan_acquire(&L.tsan_end);
#endif
}

struct EmuKernel {
    const char* name;
    EmuEntry entry;
    unsigned nparams;
    const unsigned long long* sizes;
    unsigned max_threads;
};

// Unpacks cuLaunchKernel's kernelParams (pointers to each argument's value) into a call.
template <class... A, size_t... I>
static inline void __emu_call_impl(void (*k)(A...), void** p, std::index_sequence<I...>) {
    k(*reinterpret_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
}
template <class... A>
static inline void __emu_call(void (*k)(A...), void** p) {
    __emu_call_impl(k, p, std::index_sequence_for<A...>{});
}
template <class F>
struct EmuSig;
template <class... A>
struct EmuSig<void (*)(A...)> {
    static constexpr unsigned n = sizeof...(A);
    static constexpr unsigned long long sizes[sizeof...(A) + 1] = {sizeof(A)..., 0};
};

// Filled by the registration block compile.rs appends.
static const EmuKernel* __emu_kernels();
static const char* const* __emu_names();

static std::mutex __emu_mutex;

static EmuPolicy __emu_policy(unsigned long long* seed) {
    const char* s = getenv("SIMCLR_GPU_EMU_SCHEDULE");
    if (!s || !*s || !strcmp(s, "alternate")) return EMU_ALTERNATE;
    if (!strcmp(s, "forward")) return EMU_FORWARD;
    if (!strcmp(s, "reverse")) return EMU_REVERSE;
    if (!strncmp(s, "random:", 7)) {
        *seed = strtoull(s + 7, nullptr, 10) * 0x9E3779B97F4A7C15ull + 1;
        return EMU_RANDOM;
    }
    fprintf(stderr, "simclr-gpu-emu: unknown SIMCLR_GPU_EMU_SCHEDULE=%s (alternate, forward, reverse, random:SEED); "
                    "using alternate\n", s);
    return EMU_ALTERNATE;
}

extern "C" __attribute__((visibility("default"))) const char* const* emu_kernel_names(void) { return __emu_names(); }

extern "C" __attribute__((visibility("default"))) int emu_kernel_info(const char* name, unsigned* nparams,
                                                                     unsigned long long* param_sizes,
                                                                     unsigned* max_threads_per_block,
                                                                     unsigned long long* static_shared_bytes) {
    for (const EmuKernel* k = __emu_kernels(); k->name; k++) {
        if (strcmp(k->name, name) != 0) continue;
        if (nparams) *nparams = k->nparams;
        if (param_sizes)
            for (unsigned i = 0; i < k->nparams && i < 256; i++) param_sizes[i] = k->sizes[i];
        if (max_threads_per_block) *max_threads_per_block = k->max_threads;
        // The kernel's own (compile.rs' figure), else the module's total.
        if (static_shared_bytes) {
            unsigned long long v = __emu_kernel_shared[k - __emu_kernels()];
            *static_shared_bytes = v == ~0ull ? __emu_static_shared_bytes() : v;
        }
        return 0;
    }
    return 1;
}

static int __emu_ret(int code, char* msg, unsigned long long cap, const char* text) {
    if (msg && cap) {
        size_t n = strlen(text);
        if (n >= cap) n = cap - 1;
        memcpy(msg, text, n);
        msg[n] = 0;
    }
    return code;
}

extern "C" EMU_RT __attribute__((visibility("default"))) int emu_launch(const char* name, const unsigned grid[3],
                                                                const unsigned block[3], unsigned dyn, void** params,
                                                                char* msg, unsigned long long msg_cap) {
    const EmuKernel* k = __emu_kernels();
    for (; k->name; k++)
        if (!strcmp(k->name, name)) break;
    if (!k->name) return __emu_ret(1, msg, msg_cap, "unknown kernel");
    unsigned long long nt = (unsigned long long)block[0] * block[1] * block[2];
    if (nt == 0 || nt > 1024 || grid[0] == 0 || grid[1] == 0 || grid[2] == 0)
        return __emu_ret(1, msg, msg_cap, "invalid launch configuration");
    if (dyn > EMU_DYN_SHARED_MAX) return __emu_ret(1, msg, msg_cap, "too much dynamic shared memory");
    {
        // sm_90: at most 48 KiB static (compile.rs refuses more, as ptxas does) and 227 KiB in all.
        unsigned long long st = __emu_kernel_shared[k - __emu_kernels()];
        if (st == ~0ull) st = __emu_static_shared_bytes();
        if (st > 48 * 1024 || st + dyn > EMU_DYN_SHARED_MAX) {
            char text[200];
            snprintf(text, sizeof text,
                     "kernel %s: %llu bytes of static and %u of dynamic shared memory, above what sm_90 allows "
                     "(48 KiB static, %u in all)",
                     name, st, dyn, EMU_DYN_SHARED_MAX);
            return __emu_ret(1, msg, msg_cap, text);
        }
    }
    std::lock_guard<std::mutex> lock(__emu_mutex);
    EmuLaunch& L = __emu_L;
    unsigned n = (unsigned)nt;
    if (L.cap < n) {
        EmuFiber* nf = new EmuFiber[n];
        for (unsigned i = 0; i < L.cap; i++) nf[i] = L.fibers[i];  // keep the stacks mapped so far
        delete[] L.fibers;
        L.fibers = nf;
        delete[] L.order;
        L.order = new unsigned[n];
        L.cap = n;
    }
    unsigned nw = (n + 31) / 32;
    if (L.warp_cap < nw) {
        delete[] L.warps;
        L.warps = new EmuWarp[nw];
        L.warp_cap = nw;
    }
    L.n = n;
    L.dyn = dyn;
    L.entry = k->entry;
    L.params = params;
    L.shared_vars = __emu_kernel_shared_vars[k - __emu_kernels()];
    L.failed = false;
    L.msg[0] = 0;
    L.rng = 0;
    L.policy = __emu_policy(&L.rng);
#ifdef EMU_TSAN
    if (!L.tsan_sched) L.tsan_sched = __tsan_get_current_fiber();
    L.tsan_sched = __tsan_get_current_fiber();
#endif
    for (unsigned i = 0; i < n; i++) {
        EmuFiber& f = L.fibers[i];
        f.linear = i;
        f.tid = uint3{i % block[0], (i / block[0]) % block[1], i / (block[0] * block[1])};
    }
    blockDim = dim3(block[0], block[1], block[2]);
    gridDim = dim3(grid[0], grid[1], grid[2]);
#if EMU_FTZ
    // --ftz=true: f32 denormals flushed, inputs and results (MXCSR DAZ + FTZ) while the kernel
    // runs. x86 flushes f64 too, where the GPU does not: a known difference.
    unsigned mxcsr = __builtin_ia32_stmxcsr();
    __builtin_ia32_ldmxcsr(mxcsr | 0x8040u);
#endif
    unsigned long long b = 0;
    for (unsigned z = 0; z < grid[2] && !L.failed; z++)
        for (unsigned y = 0; y < grid[1] && !L.failed; y++)
            for (unsigned x = 0; x < grid[0] && !L.failed; x++, b++) {
                blockIdx = uint3{x, y, z};
                bool desc = L.policy == EMU_REVERSE || (L.policy == EMU_ALTERNATE && (b & 1));
                __emu_run_block(desc);
            }
#if EMU_FTZ
    __builtin_ia32_ldmxcsr(mxcsr);
#endif
    L.cur = -1;
    if (L.failed) return __emu_ret(719, msg, msg_cap, L.msg);
    return __emu_ret(0, msg, msg_cap, "");
}

#if __has_include("emu_ptx.h")
#include "emu_ptx.h"
#else
// emu_ptx.h (the PTX instructions) is not there yet: every inline PTX statement traps.
EMU_HIDDEN bool __emu_ptx_exec(const char*, EmuOperand*, int) { return false; }
#endif

// A failed device assert traps (the GPU's assert ends the kernel with cudaErrorAssert; the
// emulator reports CUDA_ERROR_LAUNCH_FAILED). Defined last: a header above may include <cassert>.
#undef assert
#define assert(e) ((e) ? (void)0 : __emu_assert_fail(#e, __FILE__, __LINE__))
