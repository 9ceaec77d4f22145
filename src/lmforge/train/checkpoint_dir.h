// A run directory's checkpoints on disk (train/checkpoint.h has the public functions): the
// manifest that makes a step-N directory complete and its verification, listing, pruning and
// finding them. Shared by checkpoint.cpp's save.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace lmforge::checkpoint_dir {

// fsync a file or directory: data and metadata of a file, the entries (creations, renames) of a
// directory.
void sync_path(const std::filesystem::path& p, bool directory);

// Hashes and fsyncs every file under dir, fsyncs its directories, then writes manifest.json (and
// fsyncs it and dir): once it exists, everything it lists is on disk. `expected` names files other
// processes wrote (the ranks' shards), listed even where this process's cached view of the
// directory (a network filesystem) does not show them yet, and an error when they are missing.
void write_manifest(const std::filesystem::path& dir,
                    const std::vector<std::string>& expected = {});

}  // namespace lmforge::checkpoint_dir
