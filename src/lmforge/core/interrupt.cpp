#include "lmforge/core/interrupt.h"

#include <csignal>

namespace lmforge {

namespace {

volatile std::sig_atomic_t g_signal = 0;

void note(int sig) { g_signal = sig; }

}  // namespace

void catch_interrupts() {
  struct sigaction sa {};
  sa.sa_handler = note;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESETHAND | SA_RESTART;  // the next one: the default action
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

int interrupted() { return g_signal; }

}  // namespace lmforge
