#include "lmforge/core/interrupt.h"

#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstring>
#include <mutex>
#include <thread>

#include "lmforge/core/leftovers.h"

namespace lmforge {

namespace {

std::atomic<int> g_signal{0};
std::atomic<bool> g_catching{false};

// SIGINT and SIGTERM, but one ignored when the process started (a command started with `&`
// from a script ignores SIGINT; nohup-like wrappers): ignored it stays, as it would without
// lmforge's handling (a blocked signal reaches sigwait even when ignored).
sigset_t handled() {
  static const sigset_t set = [] {
    sigset_t s;
    sigemptyset(&s);
    for (int sig : {SIGINT, SIGTERM}) {
      struct sigaction old {};
      if (sigaction(sig, nullptr, &old) != 0 || old.sa_handler != SIG_IGN) sigaddset(&s, sig);
    }
    return s;
  }();
  return set;
}

void set_action(void (*handler)(int)) {
  const sigset_t set = handled();
  struct sigaction sa {};
  sa.sa_handler = handler;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  for (int sig : {SIGINT, SIGTERM})
    if (sigismember(&set, sig)) sigaction(sig, &sa, nullptr);
}

// The default action of `sig` now (the process ends), from the thread that took it, once what
// the process was writing is removed (core/leftovers.h; said when there was some).
[[noreturn]] void default_action(int sig) {
  if (remove_leftovers(/*for_exit=*/true) > 0) {
    const char* line = sig == SIGINT
                           ? "lmforge: interrupted (Ctrl-C); removed what it was writing\n"
                           : "lmforge: interrupted (Terminated); removed what it was "
                             "writing\n";
    [[maybe_unused]] ssize_t n = write(STDERR_FILENO, line, std::strlen(line));
  }
  signal(sig, SIG_DFL);
  sigset_t one;
  sigemptyset(&one);
  sigaddset(&one, sig);
  pthread_sigmask(SIG_UNBLOCK, &one, nullptr);
  raise(sig);
  _exit(128 + sig);
}

// A thread the signal reached without blocking it (one started before catch_interrupts): only
// what is async-signal-safe here; the second signal ends the process without removing leftovers.
void note(int sig) {
  int none = 0;
  if (g_catching.load() && g_signal.compare_exchange_strong(none, sig)) return;
  signal(sig, SIG_DFL);
  raise(sig);  // (delivered once this handler returns)
}

// Where SIGINT and SIGTERM go once catch_interrupts has run: the calling (training) thread blocks
// them, and so do the threads it starts after; this one takes them with sigwait. A signal that
// interrupted the training thread mid-step corrupted the heap now and then under several MPI
// ranks (oneDNN's state, in the next free: "corrupted size vs. prev_size"; 1 run in 3 of 2 ranks
// of a 4-block C=768 model, 0 in 18 with this thread).
void start_waiter() {
  static std::once_flag once;
  std::call_once(once, [] {
    const sigset_t set = handled();
    if (sigisemptyset(&set)) return;
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    std::thread([set] {
      for (;;) {
        int sig = 0;
        if (sigwait(&set, &sig) != 0) continue;
        int none = 0;
        if (!g_catching.load() || !g_signal.compare_exchange_strong(none, sig))
          default_action(sig);  // not catching, or the second one
      }
    }).detach();
  });
}

}  // namespace

void catch_interrupts() {
  g_signal = 0;
  g_catching = true;
  set_action(note);
  start_waiter();
}

void end_on_interrupt() { start_waiter(); }

void release_interrupts() {
  g_catching = false;
  set_action(SIG_DFL);
}

int interrupted() { return g_signal.load(); }

}  // namespace lmforge
