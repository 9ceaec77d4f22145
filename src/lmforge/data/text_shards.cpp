#include "lmforge/data/text_shards.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>

#include "lmforge/core/error.h"
#include "lmforge/core/leftovers.h"
#include "lmforge/data/shard.h"
#include "lmforge/io/atomic_file.h"
#include "lmforge/tokenizer/bpe_trainer.h"

namespace lmforge {

namespace fs = std::filesystem;

std::string cache_dir() {
  std::string dir;
  if (const char* c = std::getenv("LMFORGE_CACHE"); c && *c)
    dir = c;
  else if (const char* h = std::getenv("HOME"); h && *h)
    dir = std::string(h) + "/.cache/lmforge";
  else
    dir = ".lmforge-cache";
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail("{}: cannot create the cache directory ({}); set LMFORGE_CACHE", dir, ec.message());
  return dir;
}

namespace {

// Whether a file holds the whole Bible as `bible` prints it: its last verse at the end (`bible`
// exits 0 when its output is cut by a full disk, and a cut corpus would be trained on silently).
bool whole_bible(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return false;
  const std::streamoff size = in.tellg();
  if (size < 1000000) return false;
  std::string tail(200, '\0');
  in.seekg(size - static_cast<std::streamoff>(tail.size()));
  in.read(tail.data(), static_cast<std::streamsize>(tail.size()));
  return in && tail.find("\nRev22:21 ") != std::string::npos && tail.ends_with("Amen.\n");
}

// `bible -f "Gen1:1-Rev22:21" > out`: its wait status, or -errno when it could not start. Run with
// no signal blocked (lmforge's threads block SIGINT for their waiter: core/interrupt.h), so that
// a Ctrl-C at the terminal ends it with lmforge (a signal lmforge ignores, it ignores too).
int run_bible(const std::string& out) {
  posix_spawn_file_actions_t files;
  posix_spawn_file_actions_init(&files);
  posix_spawn_file_actions_addopen(&files, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&files, 2, "/dev/null", O_WRONLY, 0);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK);
  std::string a0 = "bible", a1 = "-f", a2 = "Gen1:1-Rev22:21";
  char* argv[] = {a0.data(), a1.data(), a2.data(), nullptr};
  pid_t pid = 0;
  const int err = posix_spawnp(&pid, "bible", &files, &attr, argv, environ);
  posix_spawn_file_actions_destroy(&files);
  posix_spawnattr_destroy(&attr);
  if (err != 0) return -err;
  int status = 0;
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) return -errno;
  return status;
}

}  // namespace

std::string demo_corpus_path() {
  std::string dir = cache_dir() + "/demo", path = dir + "/kjv.txt";
  if (whole_bible(path)) return path;  // (one cut by an earlier version is made again)
  fs::create_directories(dir);
  // Per process: two runs on a fresh cache each write their own, and the last rename wins.
  std::string tmp = fmt::format("{}.{}.tmp", path, getpid());
  note_temp(tmp);  // (a Ctrl-C meanwhile removes it)
  const int rc = run_bible(tmp);
  std::error_code ec;
  const bool whole = rc == 0 && whole_bible(tmp);
  const auto bytes = fs::file_size(tmp, ec);
  if (!whole) {
    fs::remove(tmp, ec);
    forget_temp(tmp);
    if (rc > 0 && WIFSIGNALED(rc))  // (a Ctrl-C at the terminal reaches it too)
      fail(
          "demo corpus: `bible` was ended by {} before it wrote the whole King James Bible; run "
          "again",
          WTERMSIG(rc) == SIGINT ? "Ctrl-C" : strsignal(WTERMSIG(rc)));
    if (rc == -ENOENT)
      fail(
          "demo corpus: the `bible` program (Debian package bible-kjv) is missing; install it "
          "with `sudo apt-get install bible-kjv` or run scripts/demo.sh");
    fail(
        "demo corpus: {}: `bible` wrote {} bytes, not the whole King James Bible (is the disk "
        "full?); free space there or set LMFORGE_CACHE to another directory, and run again",
        tmp, ec ? 0 : bytes);
  }
  fs::rename(tmp, path);
  forget_temp(tmp);
  return path;
}

namespace {

// data.text's file: "demo:kjv" made if need be; a file with text in it, or an error naming it.
std::string text_path(const std::string& spec) {
  std::string path = spec == "demo:kjv" ? demo_corpus_path() : spec;
  std::error_code ec;
  if (!fs::exists(path, ec)) fail("data.text: {}: no such file; check the path", path);
  if (!fs::is_regular_file(path, ec))
    fail(
        "data.text: {}: not a file; give one text file (prepare a directory of files with "
        "lmforge prepare, then set data.train)",
        path);
  if (fs::file_size(path, ec) == 0) fail("data.text: {}: the file is empty", path);
  return path;
}

}  // namespace

int64_t bpe_spec_size(const std::string& spec) {
  if (!spec.starts_with("bpe:") || spec.size() == 4 || spec.size() > 4 + 12) return 0;
  int64_t n = 0;
  for (char c : spec.substr(4)) {
    if (c < '0' || c > '9') return 0;
    n = n * 10 + (c - '0');
  }
  return n;
}

size_t held_out_cut(const std::string& text, double val_fraction) {
  size_t cut = text.size() - static_cast<size_t>(text.size() * val_fraction);
  if (val_fraction <= 0) return cut;
  // Back to a line's start, where one is within half the held-out share (a text of few, long
  // lines kept ~all of it held out: a 200 kB line after a title left 7 training tokens); else at
  // a character's start, mid-line.
  const size_t window = (text.size() - cut) / 2;
  const size_t nl = text.rfind('\n', cut);
  if (nl != std::string::npos && nl > 0 && (nl + 1 >= cut || cut - (nl + 1) <= window))
    return nl + 1;
  for (int back = 0; back < 3 && cut > 0 && cut < text.size() &&
                     (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80;
       ++back)
    --cut;  // (a UTF-8 continuation byte; at most 3: text that is not UTF-8 stays where it is)
  return cut;
}

std::string bpe_tokenizer_for_text(const std::string& spec, int64_t vocab_size, double val_fraction,
                                   bool train_if_missing) {
  // (looking: the demo corpus is not made for it)
  if (!train_if_missing && spec == "demo:kjv" && !whole_bible(cache_dir() + "/demo/kjv.txt"))
    return "";
  const std::string path = text_path(spec);
  if (!(val_fraction >= 0 && val_fraction < 1))
    fail("data.val_fraction: {} must be in [0, 1)", val_fraction);
  auto mtime = fs::last_write_time(path).time_since_epoch().count();
  size_t key =
      std::hash<std::string>{}(fmt::format("{}|{}|{}|{}|{}|bpe-v3", fs::absolute(path).string(),
                                           fs::file_size(path), mtime, vocab_size, val_fraction));
  std::string dir = fmt::format("{}/tokenizers/{:016x}", cache_dir(), key);
  std::string out = dir + "/tokenizer.json";
  if (fs::exists(out)) return out;
  if (!train_if_missing) return "";
  BpeTrainOptions o;
  o.vocab_size = vocab_size;
  if (val_fraction > 0) o.max_bytes = held_out_cut(read_file(path), val_fraction);
  BpeTrainResult r = train_bpe({path}, o);
  fs::create_directories(dir);
  write_file_atomic(out, r.tokenizer_json);
  return out;
}

TextShards shards_from_text(const std::string& spec, double val_fraction, const Tokenizer& tok) {
  const std::string path = text_path(spec);
  if (!(val_fraction >= 0 && val_fraction < 1))
    fail("data.val_fraction: {} must be in [0, 1)", val_fraction);
  auto mtime = fs::last_write_time(path).time_since_epoch().count();
  size_t key = std::hash<std::string>{}(
      fmt::format("{}|{}|{}|{}|{}|shard-v4", fs::absolute(path).string(), fs::file_size(path),
                  mtime, val_fraction, tok.fingerprint()));
  std::string dir = fmt::format("{}/text-shards/{:016x}", cache_dir(), key);
  TextShards out{dir + "/train.bin", dir + "/val.bin"};
  if (fs::exists(out.train) && fs::exists(out.val)) return out;
  fs::create_directories(dir);

  std::string text = read_file(path);
  const size_t cut = held_out_cut(text, val_fraction);
  auto to_shard = [&](std::string_view part, const std::string& file) {
    // One text, as `tokenizer encode FILE` and prepare encode it: chunks cut at newlines are no
    // pre-tokenizer boundary (a newline run splits in two, a prefix space or SentencePiece's ▁
    // would start each chunk).
    // (streamed from the ids: no second copy of a large text's tokens)
    const std::vector<int32_t> ids = tok.encode(part);
    const bool small = std::all_of(ids.begin(), ids.end(), [](int32_t t) { return t < 65536; }) &&
                       tok.bos_id() < 65536 && tok.eos_id() < 65536;
    ShardWriter w(file,
                  {tok.fingerprint(), tok.kind(), static_cast<uint64_t>(tok.vocab_size()),
                   tok.bos_id(), tok.eos_id()},
                  small ? 2 : 4);
    w.begin_document();
    if (tok.bos_id() >= 0) w.append(tok.bos_id());
    w.append(ids.data(), ids.size());
    if (tok.eos_id() >= 0) w.append(tok.eos_id());
    w.commit();
  };
  to_shard(std::string_view(text).substr(cut), out.val);
  to_shard(std::string_view(text).substr(0, cut), out.train);  // written last: marks completion
  return out;
}

}  // namespace lmforge
