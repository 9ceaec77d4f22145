// Leftovers: what this process is writing and would leave half-done if it ended now, so that an
// error or an interrupt that ends a command leaves nothing behind: temporaries (AtomicFile's and
// fresh_temp_dir's directories, a checkpoint's step-N.tmp) and the directories
// make_directories created. main() calls remove_leftovers() when an error ends a command, and
// an interrupt that ends the process does (core/interrupt.h).
//
//   note_temp(tmp, [&] { create tmp; });  write tmp; rename(tmp, path); forget_temp(tmp);
//   make_directories(out);  // removed again if the command fails and they are still empty
#pragma once

#include <functional>
#include <string>

namespace lmforge {

// make: creates tmp, called with the leftovers' lock held, so that the removal of an interrupt
// that ends the process comes wholly before it (which then never runs) or after it.
void note_temp(const std::string& tmp, const std::function<void()>& make = nullptr);
void forget_temp(const std::string& tmp);
// std::filesystem::create_directories, remembering the directories this call made (throws
// filesystem_error naming `path`).
void make_directories(const std::string& path);
// Removes the noted temporaries that still exist (whole), then the directories made that are
// empty, deepest first; returns how many things it removed. for_exit: the process ends next
// (the lock stays held, so no thread notes another temporary meanwhile).
int remove_leftovers(bool for_exit = false);

}  // namespace lmforge
