#include "lmforge/core/interrupt.h"

#include <csignal>

namespace lmforge {

namespace {

volatile std::sig_atomic_t g_signal = 0;

void set_action(void (*handler)(int)) {
  struct sigaction sa {};
  sa.sa_handler = handler;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

void note(int sig) {
  g_signal = sig;
  set_action(SIG_DFL);  // the next one, of either kind: the default action (sigaction is safe)
}

}  // namespace

void catch_interrupts() {
  g_signal = 0;
  set_action(note);
}

void release_interrupts() { set_action(SIG_DFL); }

int interrupted() { return g_signal; }

}  // namespace lmforge
