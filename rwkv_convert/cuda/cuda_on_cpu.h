// What rwkv_kernels.cuh uses from CUDA, supplied on the CPU, so that the same kernel source compiles as C++ for
// the tests (kernels_on_cpu.cpp). Each block's threads are real std::threads that take turns: one runs at a
// time, from one barrier to the next, in an order drawn anew at every barrier from a seeded generator. So a
// missing __syncthreads gives wrong numbers every time (a thread runs ahead and reads values the others have
// not written yet, or overwrites values they have not read), not only when a race happens to go badly; a
// barrier that some threads of the block never reach is named at once; and a thread that never reaches its
// barrier or never ends stops the process with one line after a timeout. Blocks run one after another, so
// `__shared__` is one array per kernel, reused by each block in turn.
// What this cannot show: timing, the GPU's memory model (everything here is sequentially consistent), warp-level
// behaviour, and --use_fast_math's approximations (the CPU build is compiled without fast math).
#pragma once

#include <math.h>
#include <stdint.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __shared__ static  // blocks run one at a time (see above); __restrict__ is GCC's own

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uchar4 {
    unsigned char x, y, z, w;
};
using cudaStream_t = void*;
using std::max;
using std::min;

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;  // set before a launch's threads start, read by them

namespace cuda_on_cpu {

struct Abort {};  // unwinds a thread out of its kernel when the launch has failed

// The threads of one launch and whose turn it is. A thread runs only while `turn` names it; at a barrier or at
// its end it hands the turn to the next thread of the current order.
class Team {
   public:
    Team(const char* kernel, dim3 grid, dim3 block, uint64_t seed)
        : kernel_(kernel),
          grid_(grid),
          size_(block.x * block.y * block.z),
          state_(size_),
          wake_(size_),
          last_block_(size_, (size_t)-1),
          rng_(seed) {}

    void run(const std::function<void()>& body, double timeout_s) {
        blocks_ = (size_t)grid_.x * grid_.y * grid_.z;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            start_block();
        }
        std::vector<std::thread> threads;
        threads.reserve(size_);
        for (unsigned me = 0; me < size_; me++) threads.emplace_back([this, me, &body] { worker(me, body); });
        // The watchdog: every hand-over counts as progress; none for timeout_s means a thread is stuck.
        std::unique_lock<std::mutex> lock(mutex_);
        uint64_t seen = progress_;
        while (!finished_) {
            if (finished_cv_.wait_for(lock, std::chrono::duration<double>(timeout_s)) == std::cv_status::timeout &&
                !finished_ && progress_ == seen) {
                std::fprintf(stderr,
                             "rwkv-convert: kernel %s (CPU build, blocks of %u threads) made no progress for %.0f s: "
                             "a thread never reaches its barrier or never ends\n",
                             kernel_, size_, timeout_s);
                std::fflush(stderr);
                std::_Exit(124);  // the stuck thread cannot be stopped; nothing else is safe
            }
            seen = progress_;
        }
        lock.unlock();
        for (auto& t : threads) t.join();
    }

    const std::string& error() const { return error_; }

    void barrier(unsigned me) {
        std::unique_lock<std::mutex> lock(mutex_);
        state_[me] = ARRIVED;
        hand_over(lock, me);
    }

   private:
    enum State { RUNNING, ARRIVED, DONE };

    void worker(unsigned me, const std::function<void()>& body) {
        threadIdx = dim3(me % blockDim.x, me / blockDim.x % blockDim.y, me / (blockDim.x * blockDim.y));
        current() = this;
        current_index() = me;
        for (;;) {
            size_t block;
            {
                std::unique_lock<std::mutex> lock(mutex_);
                if (!wait_turn(lock, me)) return;
                block = block_;
            }
            blockIdx = dim3(block % grid_.x, block / grid_.x % grid_.y, block / ((size_t)grid_.x * grid_.y));
            try {
                body();
            } catch (const Abort&) {
                return;
            }
            std::unique_lock<std::mutex> lock(mutex_);
            state_[me] = DONE;
            hand_over(lock, me);
            // wait here for this thread's turn in the next block (wait_turn at the top of the loop)
        }
    }

    // Caller holds the lock. False when the launch is over (finished or failed).
    bool wait_turn(std::unique_lock<std::mutex>& lock, unsigned me) {
        wake_[me].wait(lock, [&] { return finished_ || failed_ || (turn_ == (int)me && block_ != last_block_[me]); });
        return !(finished_ || failed_);
    }

    void hand_over(std::unique_lock<std::mutex>& lock, unsigned me) {
        progress_++;
        const bool at_barrier = state_[me] == ARRIVED;  // next_turn may set everyone RUNNING for the next phase
        if (!at_barrier) last_block_[me] = block_;
        next_turn();
        if (at_barrier) {
            wake_[me].wait(lock, [&] { return failed_ || (turn_ == (int)me && state_[me] == RUNNING); });
            if (failed_) throw Abort{};
        }
    }

    // Caller holds the lock: the next thread of this phase, or a new phase, block or the end.
    void next_turn() {
        while (++position_ < order_.size()) {
            const unsigned t = order_[position_];
            if (state_[t] == RUNNING) return wake(t);
        }
        unsigned arrived = 0, done = 0;
        for (auto s : state_) (s == ARRIVED ? arrived : done)++;
        if (arrived && done) return fail("__syncthreads() that not every thread of the block reaches (" +
                                         std::to_string(done) + " of " + std::to_string(size_) +
                                         " threads ended without it)");
        if (arrived) {  // everyone met at the barrier: the next phase, in a new order
            for (auto& s : state_) s = RUNNING;
            return start_phase();
        }
        if (++block_ < blocks_) return start_block();
        finished_ = true;
        turn_ = -1;
        finished_cv_.notify_all();
        for (auto& cv : wake_) cv.notify_all();
    }

    void start_block() {
        for (auto& s : state_) s = RUNNING;
        start_phase();
    }

    void start_phase() {
        order_.resize(size_);
        for (unsigned i = 0; i < size_; i++) order_[i] = i;
        std::shuffle(order_.begin(), order_.end(), rng_);
        position_ = 0;
        wake(order_[0]);
    }

    void wake(unsigned t) {
        turn_ = (int)t;
        wake_[t].notify_one();
    }

    void fail(const std::string& why) {
        error_ = std::string("kernel ") + kernel_ + " (CPU build), block " + std::to_string(block_) + " of " +
                 std::to_string(size_) + " threads: " + why;
        failed_ = finished_ = true;
        turn_ = -1;
        finished_cv_.notify_all();
        for (auto& cv : wake_) cv.notify_all();
    }

   public:
    static Team*& current() {
        static thread_local Team* team = nullptr;
        return team;
    }
    static unsigned& current_index() {
        static thread_local unsigned index = 0;
        return index;
    }

   private:
    const char* kernel_;
    dim3 grid_;
    unsigned size_;
    std::vector<State> state_;
    std::vector<std::condition_variable> wake_;
    std::vector<size_t> last_block_;
    std::vector<unsigned> order_;
    std::mt19937_64 rng_;
    std::mutex mutex_;
    std::condition_variable finished_cv_;
    size_t blocks_ = 0, block_ = 0, position_ = 0;
    int turn_ = -1;
    uint64_t progress_ = 0;
    bool finished_ = false, failed_ = false;
    std::string error_;
};

inline uint64_t& schedule_seed() {
    static uint64_t seed = 0;
    return seed;
}
inline std::string& last_error() {
    static thread_local std::string error;
    return error;
}

inline double timeout_seconds() {
    const char* text = std::getenv("RWKV_CONVERT_KERNEL_TIMEOUT_S");
    const double value = text ? std::atof(text) : 0.0;
    return value > 0 ? value : 30.0;
}

// One launch: grid and block as CUDA takes them; the kernel's arguments are bound by the caller.
inline bool launch(const char* kernel, dim3 grid, dim3 block, const std::function<void()>& body) {
    static std::mutex one_launch_at_a_time;  // blockDim/gridDim and the shared arrays are per process
    static uint64_t launches = 0;
    std::lock_guard<std::mutex> guard(one_launch_at_a_time);
    blockDim = block;
    gridDim = grid;
    last_error().clear();
    if ((size_t)grid.x * grid.y * grid.z == 0 || (size_t)block.x * block.y * block.z == 0) return true;
    Team team(kernel, grid, block, schedule_seed() * 1000003u + launches++);
    team.run(body, timeout_seconds());
    last_error() = team.error();
    return last_error().empty();
}

template <typename Kernel>
struct Launcher {
    const char* name;
    dim3 grid, block;
    Kernel* kernel;
    template <typename... Args>
    bool operator()(Args... args) const {
        return launch(name, grid, block, [&] { kernel(args...); });
    }
};

template <typename Kernel>
Launcher<Kernel> launcher(const char* name, dim3 grid, dim3 block, Kernel* kernel) {
    return {name, grid, block, kernel};
}

}  // namespace cuda_on_cpu

inline void __syncthreads() { cuda_on_cpu::Team::current()->barrier(cuda_on_cpu::Team::current_index()); }

// One thread runs at a time and every hand-over goes through a mutex, so a plain add is atomic here.
inline float atomicAdd(float* address, float value) {
    const float old = *address;
    *address = old + value;
    return old;
}

// (the stream is unused: one launch at a time, in order)
#define KERNEL_LAUNCH(kernel, grid, block, stream) \
    ((void)(stream), ::cuda_on_cpu::launcher(#kernel, dim3(grid), dim3(block), kernel))
