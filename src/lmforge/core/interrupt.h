// Ctrl-C and SIGTERM (a scheduler's preemption) during a run: the first one is noted and the run
// stops at the end of its step, saves a checkpoint and says how to continue (under several ranks
// after the step every rank agrees on: trainer.cpp); a second one ends the process at once (the
// default action, restored by the first). From catch_interrupts on, the calling thread (and the
// threads it starts) block both: a thread of their own takes them (sigwait), so that no step is
// interrupted mid-way (under several MPI ranks that corrupted the heap now and then). A signal
// ignored when the process started (`lmforge ... &` in a script ignores SIGINT) stays ignored.
//
//   catch_interrupts();
//   for (...) { step(); if (interrupted()) break; }
//   release_interrupts();
#pragma once

namespace lmforge {

void catch_interrupts();
// Without catch_interrupts: a signal ends the process as usual, but first removes what it was
// writing (core/leftovers.h), saying so. main() sets this up for every command but launch (whose
// handlers pass signals to its ranks); call it before starting threads.
void end_on_interrupt();
// Back to the default actions (a signal noted stays noted).
void release_interrupts();
// The signal noted (SIGINT, SIGTERM), or 0.
int interrupted();

}  // namespace lmforge
