// lmforge: train large language models from one native program.
// Every user error is one line on stderr and exit code 1 (lmforge::Error is caught here).
#include <execinfo.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <new>
#include <string>

#include "commands.h"
#include "lmforge/core/error.h"
#include "lmforge/core/interrupt.h"
#include "lmforge/core/leftovers.h"
#include "lmforge/core/tensor.h"
#include "lmforge/dist/communicator.h"
#include "lmforge/io/atomic_file.h"

namespace {

// SIGBUS: a memory-mapped file (a data shard, a checkpoint's tensors) shrank under this process
// (truncated or rewritten in place by someone else). One line instead of "Bus error".
void mapped_file_shrank(int) {
  static const char kLine[] =
      "lmforge: bus error: a memory-mapped file shrank while it was read (a data shard or "
      "checkpoint file truncated or rewritten during the run) or its filesystem ran out of space; "
      "restore it and run again (train: --resume)\n";
  [[maybe_unused]] ssize_t n = write(STDERR_FILENO, kLine, sizeof kLine - 1);
  _exit(1);
}

}  // namespace

int main(int argc, char** argv) {
  // A file grown past `ulimit -f` fails its write (EFBIG), said as every failed write is, instead
  // of SIGXFSZ ending the process with nothing said and temporary files left behind.
  std::signal(SIGXFSZ, SIG_IGN);
  std::signal(SIGBUS, mapped_file_shrank);
  // glibc loads libgcc_s's unwinder the first time an exception unwinds through its C code (oneDNN
  // throws bad_alloc through pthread_once when memory runs out); then, short of memory, that load
  // fails and glibc aborts. backtrace() loads it now, while there is memory.
  void* frame = nullptr;
  backtrace(&frame, 1);
  // Ctrl-C or SIGTERM removes what the command was writing before the process ends (launch
  // passes them to its ranks instead, and train notes them: core/interrupt.h). Before any thread
  // starts, so that all of them leave the signals to the one thread that takes them.
  if (!(argc > 1 && std::string(argv[1]) == "launch")) lmforge::end_on_interrupt();
  CLI::App app{"lmforge: train large language models end to end, natively (no Python)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "lmforge 0.1.0");
  lmforge::app::add_train(app);
  lmforge::app::add_generate(app);
  lmforge::app::add_bench(app);
  lmforge::app::add_tokenizer(app);
  lmforge::app::add_prepare(app);
  lmforge::app::add_hf(app);
  lmforge::app::add_plot(app);
  lmforge::app::add_lr_find(app);
  lmforge::app::add_eval(app);
  lmforge::app::add_chat(app);
  lmforge::app::add_plan(app);
  lmforge::app::add_launch(app);
  // A word where the command goes that names none: CLI11 would say "A subcommand is required".
  std::string names;
  bool known = false;
  for (const CLI::App* c : app.get_subcommands({})) {
    names += (names.empty() ? "" : ", ") + c->get_name();
    known |= argc > 1 && c->get_name() == argv[1];
  }
  if (argc > 1 && argv[1][0] != '-' && !known) {
    std::fprintf(stderr, "lmforge: unknown command \"%s\"; the commands: %s (lmforge --help)\n",
                 argv[1], names.c_str());
    return 1;
  }
  try {
    app.parse(argc, argv);
    lmforge::check_stdout(/*flush=*/true);  // what it printed reached its file
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::RuntimeError& e) {  // a subcommand's own exit status (launch's ranks)
    return e.get_exit_code();
  } catch (const CLI::ParseError& e) {  // a bad option or argument: one line, as every error
    std::fprintf(stderr, "lmforge: %s; see lmforge --help (or SUBCOMMAND --help)\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    lmforge::remove_leftovers();
    lmforge::dist::abort_job("lmforge: out of memory; " + lmforge::oom_hint());
  } catch (const std::filesystem::filesystem_error& e) {  // names the path(s) itself
    lmforge::remove_leftovers();
    lmforge::dist::abort_job(std::string("lmforge: ") + e.what() +
                             "; check the path and its permissions");
  } catch (const std::exception& e) {  // lmforge::Error and the rest: one line
    // Under several ranks this stops the others too, which would wait for this one.
    lmforge::remove_leftovers();  // (what the command was writing: nothing half-written)
    lmforge::dist::abort_job(std::string("lmforge: ") + e.what());
  }
  return 0;
}
