// Subcommands of the lmforge CLI, one file each; main.cpp wires them into CLI11.
#pragma once

#include <CLI/CLI.hpp>
#include <memory>
#include <string>
#include <vector>

#include "lmforge/io/config.h"
#include "lmforge/tokenizer/tokenizer.h"

namespace lmforge::app {

extern const char* const kDefaultConfigYaml;

// The config `lmforge train [FILE] [--set K=V]...` runs: FILE, or the embedded default as the
// base, then the --set assignments (train.cpp).
lmforge::Config load_run_config(const std::string& file, const std::vector<std::string>& sets);

void add_train(CLI::App& app);
void add_generate(CLI::App& app);
void add_chat(CLI::App& app);  // generate.cpp
void add_eval(CLI::App& app);
void add_plan(CLI::App& app);  // memory, traffic and time per strategy  // multiple-choice accuracy
                               // (HellaSwag)
void add_bench(CLI::App& app);
void add_tokenizer(CLI::App& app);
void add_prepare(CLI::App& app);
void add_hf(CLI::App& app);  // convert, export, info
// A Hugging Face model directory's tokenizer, checked against its config.json's vocabulary (hf.cpp;
// convert, and generate/chat with hf:DIR).
std::unique_ptr<lmforge::Tokenizer> hf_dir_tokenizer(const std::string& dir,
                                                     const lmforge::ModelConfig& model);
void add_plot(CLI::App& app);
void add_lr_find(CLI::App& app);
void add_launch(CLI::App& app);  // N ranks of lmforge through mpirun

}  // namespace lmforge::app
