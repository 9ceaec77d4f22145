// Checkpoint saving, verification and retention (train/checkpoint.h) on a one-layer model: the
// manifest lists every file with its size and SHA-256; verify_checkpoint names the first damaged
// file; find_latest_checkpoint falls back past damaged and incomplete checkpoints; a save removes
// stale *.tmp directories and later steps, and keeps keep_last plus the best.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>

#include "lmforge/io/sha256.h"
#include "lmforge/models/presets.h"
#include "lmforge/train/checkpoint.h"
#include "testing/errors.h"
#include "testing/process.h"

namespace lmforge {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

ModelConfig tiny_config() {
  ModelConfig c = model_preset("gpt2-tiny");
  c.n_layer = 1;
  c.vocab_size = 257;
  c.max_seq_len = 16;
  c.validate();
  return c;
}

struct Saver {
  std::string run;
  Transformer model{tiny_config()};
  AdamW opt{model.params(), {}};
  std::unique_ptr<Tokenizer> tok = load_tokenizer("byte");

  explicit Saver(const std::string& name) : run(testing::temp_dir(name)) { model.init_weights(1); }
  std::string save(int64_t step, std::optional<double> val_loss = std::nullopt,
                   int64_t keep_last = 0) {
    TrainState st;
    st.step = step;
    st.loader = json::object();
    st.val_loss = val_loss;
    return save_checkpoint(run, model, &opt, st, "model: {}\n", keep_last, *tok);
  }
  std::string ckpt(int64_t step) const {
    return run + fmt::format("/checkpoints/step-{:08d}", step);
  }
  // The names in checkpoints/, sorted.
  std::vector<std::string> listing() const {
    std::vector<std::string> out;
    for (auto& e : fs::directory_iterator(run + "/checkpoints"))
      out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }
};

}  // namespace

TEST(Checkpoint, ManifestListsEveryFileWithSizeAndSha256) {
  Saver s("ckpt-manifest");
  std::string dir = s.save(3, 2.5);
  EXPECT_EQ(dir, s.ckpt(3));
  EXPECT_EQ(s.listing(), (std::vector<std::string>{"best", "step-00000003"}));
  json m = json::parse(testing::slurp(dir + "/manifest.json"));
  EXPECT_EQ(m["format"], "lmforge-checkpoint-manifest");
  std::vector<std::string> names;
  for (auto& f : m["files"]) {
    std::string p = dir + "/" + f["path"].get<std::string>();
    names.push_back(f["path"]);
    EXPECT_EQ(f["bytes"].get<uint64_t>(), fs::file_size(p)) << p;
    EXPECT_EQ(f["sha256"], sha256_file(p)) << p;
  }
  EXPECT_EQ(names, (std::vector<std::string>{"config.yaml", "model.safetensors",
                                             "optimizer.safetensors", "state.json"}));
  EXPECT_EQ(verify_checkpoint(dir), "");
  json st = json::parse(testing::slurp(dir + "/state.json"));
  EXPECT_EQ(st["val_loss"].get<double>(), 2.5);
  EXPECT_EQ(testing::slurp(s.run + "/checkpoints/best"), "step-00000003\n");
  EXPECT_TRUE(json::parse(testing::slurp(s.save(4) + "/state.json"))["val_loss"].is_null());

  TrainState back;
  load_checkpoint(dir, s.model, &s.opt, &back);
  EXPECT_EQ(back.step, 3);
  EXPECT_EQ(back.val_loss, 2.5);
}

// A state.json that parses but holds nonsense (as a damaged or hand-edited one may, with its
// manifest rewritten to match): an error naming the file, never a negative step run or a
// library's own message.
TEST(Checkpoint, NonsenseInStateJsonNamesTheFile) {
  Saver s("ckpt-nonsense");
  const std::string good = s.save(2);
  auto edited = [&](const std::string& name, const std::function<void(json&)>& edit) {
    const std::string dir = s.run + "/" + name;
    fs::copy(good, dir, fs::copy_options::recursive);
    json j = json::parse(testing::slurp(dir + "/state.json"));
    edit(j);
    std::ofstream(dir + "/state.json") << j.dump();
    return dir;
  };
  using testing::error_of;
  std::string dir = edited("negative", [](json& j) { j["step"] = -5; });
  std::string e = error_of([&] {
    TrainState st;
    load_checkpoint(dir, s.model, &s.opt, &st);
  });
  EXPECT_NE(e.find(dir + "/state.json: step -5 is negative"), std::string::npos) << e;
  dir = edited("array", [](json& j) { j = json::array(); });
  e = error_of([&] { checkpoint_model_config(dir); });
  EXPECT_NE(e.find(dir + "/state.json: corrupt checkpoint state (not a JSON object)"),
            std::string::npos)
      << e;
  dir = edited("heads", [](json& j) { j["model"]["n_head"] = "0"; });
  e = error_of([&] { checkpoint_model_config(dir); });
  EXPECT_NE(e.find(dir + "/state.json: model.n_head: must be positive"), std::string::npos) << e;
  dir = edited("model-array", [](json& j) { j["model"] = json::array(); });
  e = error_of([&] { checkpoint_model_config(dir); });
  EXPECT_NE(e.find(dir + "/state.json: "), std::string::npos) << e;
  EXPECT_NE(e.find("the checkpoint is corrupt"), std::string::npos) << e;
  // A model its files do not hold: said before a model of that size is made (an n_embd of 4
  // million was "out of memory").
  dir = edited("wide", [](json& j) { j["model"]["n_embd"] = "4000000"; });
  e = error_of([&] { checkpoint_model_config(dir); });
  EXPECT_NE(e.find(dir + "/state.json: its model (n_layer=1, n_embd=4000000, vocab_size=257"),
            std::string::npos)
      << e;
  EXPECT_NE(e.find(fmt::format("is not the one its model files hold ({} values)",
                               s.model.config().num_params())),
            std::string::npos)
      << e;
}

TEST(Checkpoint, VerifyNamesTheFirstDamagedFile) {
  Saver s("ckpt-verify");
  std::string good = s.save(1);
  auto damaged = [&](const std::string& name, auto damage) {
    std::string dir = s.run + "/" + name;
    fs::copy(good, dir, fs::copy_options::recursive);
    damage(dir);
    std::string why, bad = verify_checkpoint(dir, &why);
    return std::make_pair(bad.empty() ? "" : bad.substr(dir.size() + 1), why);
  };
  auto r = damaged("truncated", [](auto d) { fs::resize_file(d + "/model.safetensors", 100); });
  EXPECT_EQ(r.first, "model.safetensors");
  EXPECT_NE(r.second.find("100 bytes, manifest.json says"), std::string::npos) << r.second;
  // A flipped bit in the tensor data: the size and the safetensors header are still fine.
  r = damaged("flipped", [](auto d) {
    testing::flip_bit(d + "/optimizer.safetensors",
                      fs::file_size(d + "/optimizer.safetensors") - 5);
  });
  EXPECT_EQ(r.first, "optimizer.safetensors");
  EXPECT_NE(r.second.find("SHA-256"), std::string::npos) << r.second;
  r = damaged("missing", [](auto d) { fs::remove(d + "/state.json"); });
  EXPECT_EQ(r.first, "state.json");
  EXPECT_NE(r.second.find("missing"), std::string::npos) << r.second;
  r = damaged("no-manifest", [](auto d) { fs::remove(d + "/manifest.json"); });
  EXPECT_EQ(r.first, "manifest.json");
  EXPECT_NE(r.second.find("incomplete"), std::string::npos) << r.second;
  r = damaged("torn-manifest", [](auto d) { fs::resize_file(d + "/manifest.json", 30); });
  EXPECT_EQ(r.first, "manifest.json");
  r = damaged("escaping-manifest", [](auto d) {
    json m = json::parse(testing::slurp(d + "/manifest.json"));
    m["files"][0]["path"] = "../truncated/config.yaml";
    std::ofstream(d + "/manifest.json") << m.dump();
  });
  EXPECT_EQ(r.first, "manifest.json");
  EXPECT_NE(r.second.find("malformed"), std::string::npos) << r.second;
  // Files the manifest does not list are not its business, unless loading would read them: a
  // tensor file (rank files are found by name), or a manifest that lists no state.json.
  r = damaged("extra", [](auto d) { std::ofstream(d + "/notes.txt") << "hi"; });
  EXPECT_EQ(r.first, "");
  r = damaged("extra-rank", [](auto d) {
    fs::copy_file(d + "/model.safetensors", d + "/model-rank-00001-of-00002.safetensors");
  });
  EXPECT_EQ(r.first, "model-rank-00001-of-00002.safetensors");
  EXPECT_NE(r.second.find("not listed in manifest.json"), std::string::npos) << r.second;
  r = damaged("unlisted-state", [](auto d) {
    json m = json::parse(testing::slurp(d + "/manifest.json"));
    json kept = json::array();
    for (const json& f : m["files"])
      if (f["path"] != "state.json") kept.push_back(f);
    m["files"] = kept;
    std::ofstream(d + "/manifest.json") << m.dump();
  });
  EXPECT_EQ(r.first, "manifest.json");
  EXPECT_NE(r.second.find("lists no state.json"), std::string::npos) << r.second;
}

TEST(Checkpoint, LatestFallsBackPastDamagedAndIncompleteOnes) {
  Saver s("ckpt-latest");
  EXPECT_FALSE(has_checkpoints(s.run));
  EXPECT_EQ(find_latest_checkpoint(s.run), "");
  for (int64_t step : {2, 4, 6}) s.save(step);
  EXPECT_EQ(find_latest_checkpoint(s.run), s.ckpt(6));
  // An interrupted save (a .tmp directory, or no manifest yet) is not a checkpoint.
  fs::copy(s.ckpt(6), s.run + "/checkpoints/step-00000008.tmp", fs::copy_options::recursive);
  fs::copy(s.ckpt(6), s.ckpt(10), fs::copy_options::recursive);
  fs::remove(s.ckpt(10) + "/manifest.json");
  EXPECT_EQ(find_latest_checkpoint(s.run), s.ckpt(6));

  testing::flip_bit(s.ckpt(6) + "/model.safetensors", 1000);
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(find_latest_checkpoint(s.run), s.ckpt(4));
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(err, "warning: " + s.ckpt(6) +
                     "/model.safetensors: contents differ from manifest.json (SHA-256 mismatch); "
                     "skipping checkpoint step-00000006; using step-00000004 instead\n");
  EXPECT_EQ(resolve_checkpoint(s.run), s.ckpt(4));
  EXPECT_EQ(resolve_checkpoint(s.ckpt(4)), s.ckpt(4));
  try {
    resolve_checkpoint(s.ckpt(6));
    FAIL() << "a damaged checkpoint resolved";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(s.ckpt(6) + "/model.safetensors: contents differ"),
              std::string::npos)
        << e.what();
  }

  fs::resize_file(s.ckpt(4) + "/state.json", 10);
  fs::remove(s.ckpt(2) + "/config.yaml");
  ::testing::internal::CaptureStderr();
  try {
    find_latest_checkpoint(s.run);
    FAIL() << "no error with every checkpoint damaged";
  } catch (const Error& e) {
    std::string what = e.what();
    EXPECT_NE(what.find(s.ckpt(6) + "/model.safetensors"), std::string::npos) << what;
    EXPECT_NE(what.find("no valid checkpoint"), std::string::npos) << what;
    EXPECT_NE(what.find("3 damaged"), std::string::npos) << what;
  }
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "");  // the error says it all
}

TEST(Checkpoint, KeepsTheLastKeepLastPlusTheBest) {
  Saver s("ckpt-keep");
  std::vector<double> val = {3.0, 2.0, 2.5, 2.6, 2.7, 2.8};
  for (int64_t step = 1; step <= 6; ++step) s.save(step, val[step - 1], /*keep_last=*/2);
  EXPECT_EQ(s.listing(),
            (std::vector<std::string>{"best", "step-00000002", "step-00000005", "step-00000006"}));
  EXPECT_EQ(testing::slurp(s.run + "/checkpoints/best"), "step-00000002\n");
  s.save(7, std::nullopt, 2);  // no evaluation at this step: the best stays
  EXPECT_EQ(s.listing(),
            (std::vector<std::string>{"best", "step-00000002", "step-00000006", "step-00000007"}));
  s.save(8, 1.5, 2);
  EXPECT_EQ(s.listing(), (std::vector<std::string>{"best", "step-00000007", "step-00000008"}));
  EXPECT_EQ(testing::slurp(s.run + "/checkpoints/best"), "step-00000008\n");

  Saver n("ckpt-keep-noval");
  for (int64_t step = 1; step <= 4; ++step) n.save(step, std::nullopt, 1);
  EXPECT_EQ(n.listing(), (std::vector<std::string>{"step-00000004"}));
}

TEST(Checkpoint, SaveRemovesStaleTmpAndLaterSteps) {
  Saver s("ckpt-stale");
  for (int64_t step : {2, 4, 6}) s.save(step);
  // What kill -9 leaves: a half-written save, a half-retired checkpoint.
  fs::create_directories(s.run + "/checkpoints/step-00000008.tmp/tokenizer");
  std::ofstream(s.run + "/checkpoints/step-00000008.tmp/model.safetensors") << "half";
  fs::create_directories(s.run + "/checkpoints/step-00000001.tmp");
  fs::create_directories(s.run + "/checkpoints/step-00000004.old.tmp");
  // Resumed from step 2: the next save is step 4, which replaces the old step 4 and ends the
  // continuation that step 6 belonged to (moved aside, not deleted).
  s.model.params().params()[0].value.data<float>()[0] += 1;
  s.save(4);
  EXPECT_EQ(s.listing(), (std::vector<std::string>{"abandoned", "step-00000002", "step-00000004"}));
  EXPECT_EQ(verify_checkpoint(s.run + "/checkpoints/abandoned/step-00000006"), "");
  EXPECT_FALSE(fs::exists(s.run + "/checkpoints/step-00000004.old.tmp"));
  EXPECT_FALSE(fs::exists(s.run + "/checkpoints/step-00000004.tmp"));
  EXPECT_EQ(verify_checkpoint(s.ckpt(4)), "");
  Transformer back(tiny_config());
  load_checkpoint(s.ckpt(4), back, nullptr, nullptr);
  EXPECT_EQ(back.params().params()[0].value.data<float>()[0],
            s.model.params().params()[0].value.data<float>()[0]);
}

// A checkpoint a reader resolved (generate, eval, export, info on a run that trains) is held for
// reading: the trainer's prune leaves it for a later one instead of removing it under the reader.
TEST(Checkpoint, APruneLeavesACheckpointBeingRead) {
  Saver s("ckpt-held");
  s.save(1, std::nullopt, /*keep_last=*/1);
  EXPECT_EQ(resolve_checkpoint(s.run), s.ckpt(1));  // held from here
  s.save(2, std::nullopt, 1);
  EXPECT_EQ(s.listing(), (std::vector<std::string>{"step-00000001", "step-00000002"}));
  EXPECT_EQ(resolve_checkpoint(s.run), s.ckpt(2));
  release_checkpoint_reads();
  s.save(3, std::nullopt, 1);
  EXPECT_EQ(s.listing(), (std::vector<std::string>{"step-00000003"}));
}

TEST(Checkpoint, WeightsOnlyCannotResumeEvenWithoutOptimizer) {
  Saver s("ckpt-weights-only");
  TrainState st;
  st.step = 0;
  save_checkpoint(s.run, s.model, nullptr, st, "", 0, *s.tok);
  EXPECT_EQ(verify_checkpoint(s.ckpt(0)), "");
  EXPECT_FALSE(fs::exists(s.ckpt(0) + "/optimizer.safetensors"));
  TrainState back;
  EXPECT_THROW(load_checkpoint(s.ckpt(0), s.model, nullptr, &back), Error);
  // With the optimizer: the same message (not the missing optimizer file), pointing at init_from.
  const std::string e =
      testing::error_of([&] { load_checkpoint(s.ckpt(0), s.model, &s.opt, &back); });
  EXPECT_NE(e.find("weights-only checkpoint"), std::string::npos) << e;
  EXPECT_NE(e.find("init_from"), std::string::npos) << e;
  load_checkpoint(s.ckpt(0), s.model, nullptr, nullptr);  // weights: fine
}

// Rank files are found by name: a missing one is named (not a tensor "missing" from rank 0's),
// as is a set of files from runs of other rank counts.
TEST(Checkpoint, AMissingRankFileIsNamed) {
  Saver s("ckpt-rank-files");
  const std::string d = s.save(1);
  fs::rename(d + "/optimizer.safetensors", d + "/optimizer-rank-00000-of-00002.safetensors");
  std::string e = testing::error_of([&] { load_checkpoint(d, s.model, &s.opt, nullptr); });
  EXPECT_NE(e.find("optimizer-rank-00001-of-00002.safetensors is missing"), std::string::npos) << e;
  fs::copy_file(d + "/optimizer-rank-00000-of-00002.safetensors",
                d + "/optimizer-rank-00000-of-00003.safetensors");
  e = testing::error_of([&] { load_checkpoint(d, s.model, &s.opt, nullptr); });
  EXPECT_NE(e.find("not the ranks of one run"), std::string::npos) << e;
}

// A state.json field of the wrong type (a hand edit, a damaged but re-hashed checkpoint) is one
// error naming the file, not a bare JSON exception.
// A checkpoint saved before a model key existed (LoRA's, Gemma's) loads with the key's default,
// which is what that model computed; a key every checkpoint has is still required.
TEST(Checkpoint, ModelKeysAddedLaterTakeTheirDefaults) {
  Saver s("ckpt-later-keys");
  std::string dir = s.save(2);
  json j = json::parse(testing::slurp(dir + "/state.json"));
  for (const char* k :
       {"lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "full_attention_every",
        "rope_local_theta", "embed_scale", "post_norms", "norm_offset"}) {
    ASSERT_TRUE(j["model"].contains(k)) << k;
    j["model"].erase(k);
  }
  std::ofstream(dir + "/state.json") << j.dump();
  const ModelConfig back = checkpoint_model_config(dir);
  EXPECT_EQ(back.n_layer, s.model.config().n_layer);
  EXPECT_EQ(back.num_params(), s.model.config().num_params());
  EXPECT_FALSE(back.embed_scale || back.post_norms || back.lora.on());
  EXPECT_EQ(back.norm_offset, 0);
  j["model"].erase("n_layer");
  std::ofstream(dir + "/state.json") << j.dump();
  try {
    checkpoint_model_config(dir);
    ADD_FAILURE() << "a checkpoint without model.n_layer was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.n_layer"), std::string::npos) << e.what();
  }
}

TEST(Checkpoint, StateFieldsOfTheWrongTypeNameTheFile) {
  Saver s("ckpt-state-types");
  std::string dir = s.save(2);
  json j = json::parse(testing::slurp(dir + "/state.json"));
  j["step"] = "x";
  std::ofstream(dir + "/state.json") << j.dump();
  TrainState back;
  try {
    load_checkpoint(dir, s.model, &s.opt, &back);
    ADD_FAILURE() << "a string step was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(dir + "/state.json"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("corrupt"), std::string::npos) << e.what();
  }
}

}  // namespace lmforge
