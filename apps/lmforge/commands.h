// Subcommands of the lmforge CLI, one file each; main.cpp wires them into CLI11.
#pragma once

#include <CLI/CLI.hpp>

namespace lmforge::app {

extern const char* const kDefaultConfigYaml;

void add_train(CLI::App& app);
void add_generate(CLI::App& app);
void add_bench(CLI::App& app);
void add_tokenizer(CLI::App& app);
void add_prepare(CLI::App& app);
void add_hf(CLI::App& app);  // convert, export, info
void add_plot(CLI::App& app);

}  // namespace lmforge::app
