#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "lmforge/core/error.h"
#include "lmforge/io/config.h"
#include "testing/paths.h"

namespace lmforge {

namespace {
Config load(const std::string& yaml, std::vector<std::string> sets = {}) {
  Config c;
  ConfigLoader l(c);
  l.load_yaml_text(yaml, "test.yaml");
  for (auto& s : sets) l.set(s);
  l.finish();
  return c;
}

std::string error_of(const std::string& yaml, std::vector<std::string> sets = {}) {
  try {
    load(yaml, sets);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(Config, PresetFirstThenOverridesInOrder) {
  Config c = load("model:\n  n_layer: 2\n  preset: llama3.2-1b\ntrain:\n  lr: 1e-3\n",
                  {"train.lr=5e-4", "model.n_kv_head=4"});
  EXPECT_EQ(c.model.arch, "llama");
  EXPECT_EQ(c.model.n_embd, 2048);
  EXPECT_EQ(c.model.n_layer, 2);  // explicit key beats the preset wherever it appears
  EXPECT_EQ(c.model.n_kv_head, 4);
  EXPECT_DOUBLE_EQ(c.train.lr, 5e-4);  // --set beats the file
  EXPECT_DOUBLE_EQ(c.model.rope_scaling.factor, 32.0);
}

// train.min_lr unset: a tenth of whatever peak the file and --set give (a fixed default rose above
// a fine-tuning lr); set, it stays as given.
TEST(Config, UnsetMinLrIsATenthOfThePeak) {
  EXPECT_DOUBLE_EQ(load("train:\n  lr: 2e-3\n").train.min_lr, 2e-4);
  EXPECT_DOUBLE_EQ(load("train:\n  lr: 2e-3\n", {"train.lr=5e-7"}).train.min_lr, 5e-8);
  EXPECT_DOUBLE_EQ(load("train:\n  lr: 2e-3\n  min_lr: 0\n").train.min_lr, 0);
  EXPECT_DOUBLE_EQ(load("train:\n  lr: 2e-3\n", {"train.min_lr=3e-4"}).train.min_lr, 3e-4);
}

TEST(Config, UnknownKeyNamesFileKeyAndKnownKeys) {
  std::string e = error_of("train:\n  lrr: 0.1\n");
  EXPECT_NE(e.find("test.yaml"), std::string::npos) << e;
  EXPECT_NE(e.find("train.lrr"), std::string::npos) << e;
  EXPECT_NE(e.find("train.lr"), std::string::npos) << e;  // suggestion list
  EXPECT_NE(error_of("", {"nope.x=1"}).find("--set"), std::string::npos);
}

TEST(Config, WrongTypesAreRejectedWithTheKey) {
  EXPECT_EQ(error_of("train:\n  lr: fast\n"),
            "test.yaml: train.lr: expected a number, got \"fast\"");
  EXPECT_NE(error_of("train:\n  steps: 1.5\n").find("train.steps: expected an integer"),
            std::string::npos);
  EXPECT_NE(error_of("model:\n  bias: maybe\n").find("model.bias: expected true or false"),
            std::string::npos);
  EXPECT_NE(error_of("train:\n  steps: [1, 2]\n").find("train.steps: expected a single value"),
            std::string::npos);
  EXPECT_NE(error_of("model:\n  preset: gpt5\n").find("unknown preset \"gpt5\""),
            std::string::npos);
  EXPECT_NE(error_of("train: {lr: 1\n").find("invalid YAML"), std::string::npos);
  // Raw bytes yaml-cpp quotes as they are (here a newline): one line, the byte written out.
  const std::string e = error_of(std::string("train:\n  steps: \xff\xfe\0\n", 20));
  EXPECT_NE(e.find("invalid YAML"), std::string::npos) << e;
  EXPECT_EQ(e.find('\n'), std::string::npos) << e;
  EXPECT_NE(error_of("", {"train.lr"}).find("expected KEY=VALUE"), std::string::npos);
}

// What YAML itself lets pass: a key given twice (the last would win), a second document (it would
// be ignored), a section with a value; a section with nothing under it sets nothing.
TEST(Config, RepeatedKeysDocumentsAndSectionValuesAreRefused) {
  EXPECT_EQ(error_of("train:\n  steps: 5\n  steps: 7\n"),
            "test.yaml:3: \"train.steps\" is given twice; keep one");
  EXPECT_NE(error_of("train:\n  steps: 5\n---\ntrain:\n  steps: 7\n").find("2 YAML documents"),
            std::string::npos);
  EXPECT_NE(error_of("train: 5\n").find("test.yaml: train: a section"), std::string::npos);
  EXPECT_NE(error_of("", {"model.rope_scaling=2"}).find("--set: model.rope_scaling: a section"),
            std::string::npos);
  EXPECT_NE(error_of("", {"train="}).find("--set: train: a section"), std::string::npos);
  EXPECT_EQ(load("train:\nmodel:\n  rope_scaling:\n").train.steps, Config().train.steps);
  EXPECT_EQ(load("train:\n  steps: 5\n---\n").train.steps, 5);  // a trailing --- is no document
  // An empty preset is none (what a resolved config.yaml of a model from hf:DIR says).
  EXPECT_EQ(load("model:\n  preset: \"\"\n  n_layer: 3\n").model.n_embd, ModelConfig().n_embd);
}

TEST(Config, ResolvedYamlRoundTrips) {
  Config a = load("model:\n  preset: gpt2-tiny\n  vocab_size: 257\nrun:\n  dir: \"x: y\"\n",
                  {"train.steps=17", "sample.prompt=In the beginning"});
  std::string yaml = config_to_yaml(a);
  Config b = load(yaml);
  EXPECT_EQ(config_to_yaml(b), yaml);
  EXPECT_EQ(b.model.vocab_size, 257);
  EXPECT_EQ(b.train.steps, 17);
  EXPECT_EQ(b.run.dir, "x: y");
  EXPECT_EQ(b.sample.prompt, "In the beginning");
}

}  // namespace lmforge

namespace lmforge {

// docs/config.md is the config reference: every key must be documented there.
TEST(Config, EveryKeyIsDocumented) {
  std::ifstream in(testing::source_dir() + "/docs/config.md");
  std::stringstream ss;
  ss << in.rdbuf();
  std::string doc = ss.str();
  ASSERT_FALSE(doc.empty());
  Config c;
  for (auto& f : fields(c))
    EXPECT_NE(doc.find("| `" + f.key + "` |"), std::string::npos)
        << f.key << " not in docs/config.md";
}

}  // namespace lmforge
