// End-to-end training on the demo corpus (the King James Bible from Debian's bible-kjv).
#include <fmt/core.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "lmforge/data/text_shards.h"
#include "lmforge/io/safetensors.h"
#include "testing/errors.h"
#include "testing/metrics.h"

namespace lmforge {

namespace fs = std::filesystem;
using testing::run_lmforge;

namespace {

// step -> record, for records that carry `key`.
std::map<int64_t, nlohmann::json> metrics(const std::string& run_dir, const std::string& key) {
  std::map<int64_t, nlohmann::json> out;
  for (auto& j : testing::records_of(run_dir + "/metrics.jsonl", key))
    out[j["step"].get<int64_t>()] = j;
  return out;
}

const char* kSmall =
    "--set model.preset=gpt2-tiny --set model.vocab_size=257 --set model.max_seq_len=64 "
    "--set data.text=demo:kjv --set data.tokenizer=byte --set train.batch_size=8 "
    "--set train.seq_len=64 "
    "--set train.lr=2e-3 --set train.min_lr=2e-4 --set train.warmup=20 --set sample.prompt= ";

}  // namespace

// The model must learn more than byte frequencies: a model that only learned the unigram
// distribution would sit at its entropy H1 (3.15 nats for the KJV's bytes); one that uses context
// goes clearly below. Start: ln(257) = 5.55. Threshold: val loss < H1 - 0.5 after 150 steps
// (~77k tokens); measured 2.41 when written.
TEST(Training, LossFallsBelowUnigramEntropyOnTheDemoCorpus) {
  std::string dir = testing::temp_dir("train-falls");
  std::string text = testing::slurp(demo_corpus_path());
  double counts[256] = {};
  for (unsigned char c : text) counts[c] += 1;
  double h1 = 0;
  for (double c : counts)
    if (c > 0) h1 -= c / text.size() * std::log(c / text.size());

  auto r = run_lmforge(std::string("train ") + kSmall +
                           "--set train.steps=150 --set train.eval_every=150 "
                           "--set train.eval_batches=16 --set run.dir=run",
                       dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto train = metrics(dir + "/run", "loss");
  auto val = metrics(dir + "/run", "val_loss");
  ASSERT_EQ(train.size(), 150u);
  ASSERT_EQ(val.size(), 1u);
  double first = train.begin()->second["loss"], vl = val.rbegin()->second["val_loss"];
  EXPECT_NEAR(first, std::log(257.0), 0.3);
  EXPECT_LT(vl, h1 - 0.5) << "unigram entropy " << h1 << ", first loss " << first;
  std::cout << "first loss " << first << ", final val loss " << vl << ", unigram entropy " << h1
            << "\n";
  for (auto& [step, j] : train) {
    EXPECT_TRUE(j.contains("lr") && j.contains("grad_norm") && j.contains("tokens_per_s"));
  }
  EXPECT_TRUE(fs::exists(dir + "/run/config.yaml"));
}

// train.profile_steps: the op-level profile of the steps after the first, in the run directory
// and on stdout; evaluation between profiled steps is left out (its forward passes would be
// counted as 8 more linear calls per eval batch), and the run's losses are the unprofiled run's.
TEST(Training, ProfileStepsWritesTheOpTable) {
  std::string dir = testing::temp_dir("train-profile");
  const std::string common = std::string("train ") + kSmall +
                             "--set train.steps=5 --set train.eval_every=2 "
                             "--set train.eval_batches=3 --set train.checkpoint_every=0 ";
  auto r = run_lmforge(common + "--set train.profile_steps=3 --set run.dir=p", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  ASSERT_EQ(run_lmforge(common + "--set run.dir=q", dir).exit_code, 0);
  const std::string table = testing::slurp(dir + "/p/profile.txt");
  EXPECT_NE(table.find("profile of 3 step(s)"), std::string::npos) << table;
  EXPECT_NE(r.out.find("profile of 3 step(s)"), std::string::npos);
  // gpt2-tiny: 4 layers x 4 linear layers + 1 LM-head chunk (8 x 64 rows), per training step.
  std::istringstream lines(table);
  std::string line;
  bool found = false;
  while (std::getline(lines, line)) {
    std::istringstream words(line);
    std::string op;
    double calls = 0;
    if (words >> op >> calls && op == "linear_forward") {
      EXPECT_DOUBLE_EQ(calls, 17.0) << line;
      found = true;
      break;
    }
  }
  EXPECT_TRUE(found) << table;
  EXPECT_FALSE(fs::exists(dir + "/q/profile.txt"));
  auto a = metrics(dir + "/p", "loss"), b = metrics(dir + "/q", "loss");
  ASSERT_EQ(a.size(), 5u);
  for (auto& [step, j] : a) EXPECT_EQ(j["loss"], b.at(step)["loss"]) << "step " << step;
}

// Interrupted-then-resumed equals uninterrupted, bit for bit: losses, and the final weights.
TEST(Training, ResumeIsBitExact) {
  std::string dir = testing::temp_dir("train-resume");
  std::string common = std::string(kSmall) +
                       "--set model.n_layer=2 --set train.steps=12 --set train.checkpoint_every=5 "
                       "--set train.keep_last=0 --set train.eval_every=0 ";
  ASSERT_EQ(run_lmforge("train " + common + "--set run.dir=a", dir).exit_code, 0);
  ASSERT_EQ(run_lmforge("train " + common + "--set run.dir=b", dir).exit_code, 0);
  // Simulate a crash right after step 10's checkpoint: later checkpoints never happened.
  fs::remove_all(dir + "/b/checkpoints/step-00000012");
  auto r = run_lmforge("train " + common + "--set run.dir=b --resume", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("resumed from"), std::string::npos);
  EXPECT_NE(r.out.find("step-00000010"), std::string::npos) << r.out;
  auto a = metrics(dir + "/a", "loss"), b = metrics(dir + "/b", "loss");
  ASSERT_EQ(a.size(), 12u);
  ASSERT_EQ(b.size(), 12u);  // metrics.jsonl was cut back to step 10, then continued
  for (auto& [step, j] : a) {
    EXPECT_EQ(j["loss"].get<double>(), b[step]["loss"].get<double>()) << "step " << step;
    EXPECT_EQ(j["grad_norm"].get<double>(), b[step]["grad_norm"].get<double>()) << "step " << step;
  }
  EXPECT_EQ(testing::slurp(dir + "/a/checkpoints/step-00000012/model.safetensors"),
            testing::slurp(dir + "/b/checkpoints/step-00000012/model.safetensors"));
  EXPECT_EQ(testing::slurp(dir + "/a/checkpoints/step-00000012/optimizer.safetensors"),
            testing::slurp(dir + "/b/checkpoints/step-00000012/optimizer.safetensors"));

  // run.dir/dashboard.html: finished (no reload), the last step, the latest loss, the charts of
  // what the run logged; the resumed run's from its whole history.
  const std::string last_loss = fmt::format("<tr><th>loss</th><td>{:.6g}</td><td>12</td></tr>",
                                            a.at(12)["loss"].get<double>());
  for (const char* run : {"a", "b"}) {
    const std::string page = testing::slurp(dir + "/" + run + "/dashboard.html");
    EXPECT_NE(page.find("step 12 of 12"), std::string::npos) << run;
    EXPECT_NE(page.find("finished"), std::string::npos) << run;
    EXPECT_EQ(page.find("http-equiv=\"refresh\""), std::string::npos) << run;
    EXPECT_NE(page.find(last_loss), std::string::npos) << run << ": " << last_loss;
    size_t charts = 0;
    for (size_t at = page.find("<svg"); at != std::string::npos; at = page.find("<svg", at + 1))
      ++charts;
    EXPECT_EQ(charts, 4u) << run << ": loss, lr, gradient norm, throughput";
  }

  // Generation from the checkpoint is reproducible for a seed and continues the prompt.
  std::string gen = "generate --checkpoint a --prompt 'And God said' --max-tokens 40 --seed 3";
  auto g1 = run_lmforge(gen, dir), g2 = run_lmforge(gen, dir);
  ASSERT_EQ(g1.exit_code, 0) << g1.err;
  EXPECT_EQ(g1.out, g2.out);
  EXPECT_EQ(g1.out.rfind("And God said", 0), 0u);
  EXPECT_GT(g1.out.size(), std::string("And God said").size() + 10);

  // Several samples decoded together: each as its own run with seed 3, 4, 5 prints it.
  auto many = run_lmforge(gen + " --num-samples 3 --batch 2", dir);
  ASSERT_EQ(many.exit_code, 0) << many.err;
  const std::string sep = "---------------\n";
  std::string want;
  for (int seed : {3, 4, 5}) {
    auto one =
        run_lmforge("generate --checkpoint a --prompt 'And God said' --max-tokens 40 --seed " +
                        std::to_string(seed),
                    dir);
    ASSERT_EQ(one.exit_code, 0) << one.err;
    want += one.out + sep;
  }
  EXPECT_EQ(many.out, want);
  // --prompts: one JSON line per prompt and sample, in the file's order.
  std::ofstream(dir + "/prompts.jsonl") << R"({"prompt": "And God said"})"
                                        << "\n\n"
                                        << R"({"prompt": "In the beginning", "id": 7})"
                                        << "\n";
  auto js = run_lmforge(
      "generate --checkpoint a --prompts prompts.jsonl --max-tokens 40 --seed 3 --num-samples 2",
      dir);
  ASSERT_EQ(js.exit_code, 0) << js.err;
  std::vector<nlohmann::json> lines;
  std::istringstream in(js.out);
  for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(lines.size(), 4u) << js.out;
  for (size_t r = 0; r < 4; ++r) {
    EXPECT_EQ(lines[r]["prompt"], r < 2 ? "And God said" : "In the beginning") << r;
    EXPECT_EQ(lines[r]["sample"], r % 2) << r;
    EXPECT_TRUE(lines[r]["finish_reason"] == "stop" || lines[r]["finish_reason"] == "length");
  }
  // (its first: the first sample above, but for a stop token's text and the newline, invalid
  // UTF-8 replaced by U+FFFD as JSON output must)
  const std::string first =
      nlohmann::json::parse(nlohmann::json(g1.out.substr(12, g1.out.size() - 13))
                                .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace))
          .get<std::string>();
  EXPECT_EQ(first.rfind(lines[0]["completion"].get<std::string>(), 0), 0u) << first;
  if (lines[0]["finish_reason"] == "length") {
    EXPECT_EQ(lines[0]["completion"], first);
  }
}

// train.optimizer: muon. It learns (on the demo corpus, as fast as AdamW at the same lr, which
// match_rms_adamw lets it share), a resume continues bit for bit (the momentum buffers are in the
// checkpoint: the blocks' matrices have an m and no v), and resuming with another optimizer is
// one clear error.
TEST(Training, MuonLearnsAndResumesBitExact) {
  std::string dir = testing::temp_dir("train-muon");
  std::string common = std::string(kSmall) +
                       "--set model.n_layer=2 --set train.steps=60 --set train.checkpoint_every=25 "
                       "--set train.keep_last=0 --set train.eval_every=0 ";
  const std::string muon = "--set train.optimizer=muon ";
  ASSERT_EQ(run_lmforge("train " + common + muon + "--set run.dir=a", dir).exit_code, 0);
  ASSERT_EQ(run_lmforge("train " + common + muon + "--set run.dir=b", dir).exit_code, 0);
  ASSERT_EQ(run_lmforge("train " + common + "--set run.dir=adamw", dir).exit_code, 0);
  fs::remove_all(dir + "/b/checkpoints/step-00000060");
  testing::expect_one_line_error(run_lmforge("train " + common + "--set run.dir=b --resume", dir),
                                 {"step-00000050", "muon", "train.optimizer: muon"});
  auto r = run_lmforge("train " + common + muon + "--set run.dir=b --resume", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("step-00000050"), std::string::npos) << r.out;
  auto a = metrics(dir + "/a", "loss"), b = metrics(dir + "/b", "loss");
  auto w = metrics(dir + "/adamw", "loss");
  ASSERT_EQ(a.size(), 60u);
  ASSERT_EQ(b.size(), 60u);
  for (auto& [step, j] : a)
    EXPECT_EQ(j["loss"].get<double>(), b[step]["loss"].get<double>()) << "step " << step;
  const std::string last = "/checkpoints/step-00000060/";
  EXPECT_EQ(testing::slurp(dir + "/a" + last + "model.safetensors"),
            testing::slurp(dir + "/b" + last + "model.safetensors"));
  EXPECT_EQ(testing::slurp(dir + "/a" + last + "optimizer.safetensors"),
            testing::slurp(dir + "/b" + last + "optimizer.safetensors"));
  Safetensors opt = Safetensors::open(dir + "/a" + last + "optimizer.safetensors");
  EXPECT_TRUE(opt.has("m.blocks.0.attn.qkv.weight"));
  EXPECT_FALSE(opt.has("v.blocks.0.attn.qkv.weight"));
  EXPECT_TRUE(opt.has("v.tok_emb.weight"));
  // convert --from-checkpoint consolidates it, Muon's state and all (the same tensors).
  r = run_lmforge("convert --from-checkpoint b/checkpoints/step-00000050 --out c", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  {
    Safetensors in = Safetensors::open(dir + "/b/checkpoints/step-00000050/optimizer.safetensors");
    Safetensors out = Safetensors::open(dir + "/c/checkpoints/step-00000050/optimizer.safetensors");
    EXPECT_TRUE(in.names() == out.names());
    for (const std::string& n : in.names()) {
      const Tensor x = in.get(n), y = out.get(n);
      EXPECT_TRUE(x.nbytes() == y.nbytes() && std::memcmp(x.raw(), y.raw(), x.nbytes()) == 0) << n;
    }
  }
  // The mean of the last 10 losses: below the start by far, and not behind AdamW's.
  auto tail = [](const std::map<int64_t, nlohmann::json>& m) {
    double s = 0;
    for (int64_t step = 51; step <= 60; ++step) s += m.at(step)["loss"].get<double>();
    return s / 10;
  };
  std::printf("last 10 steps' mean loss: muon %.4f, adamw %.4f (first %.4f)\n", tail(a), tail(w),
              a.at(1)["loss"].get<double>());
  EXPECT_LT(tail(a), a.at(1)["loss"].get<double>() - 2.0);
  EXPECT_LT(tail(a), tail(w) + 0.05);
}

// train.hellaswag: HellaSwag-format examples (made from the corpus) scored at every evaluation in
// the training model's own batches (6 rows: an example's 4 endings may span two forwards), as
// llm.c does; the last score is what `lmforge eval` gives for the final checkpoint (the same
// weights, one example per forward; at most one near-tie may fall the other way).
TEST(Training, HellaSwagIsScoredAtEveryEvaluation) {
  std::string dir = testing::temp_dir("train-hellaswag");
  std::vector<std::vector<std::string>> verses;
  {
    std::istringstream text(testing::slurp(demo_corpus_path()));
    for (std::string line; std::getline(text, line) && verses.size() < 60;) {
      std::istringstream ws(line);
      std::vector<std::string> w{std::istream_iterator<std::string>(ws), {}};
      if (w.size() >= 8) verses.push_back(w);
    }
  }
  {
    std::ofstream f(dir + "/hs.jsonl");
    for (size_t i = 0; i < 30; ++i) {
      std::vector<std::string> endings;
      for (size_t k = 0; k < 4; ++k) {
        const auto& v = verses[(i + 13 * k) % verses.size()];
        endings.push_back(v[4] + " " + v[5] + " " + v[6]);
      }
      const auto& v = verses[i];
      f << nlohmann::json({{"ctx", v[0] + " " + v[1] + " " + v[2] + " " + v[3]},
                           {"endings", endings},
                           {"label", 0}})
               .dump()
        << "\n";
    }
  }
  auto r = run_lmforge(
      std::string("train ") + kSmall +
          "--set model.n_layer=2 --set train.steps=40 --set train.eval_every=20 "
          "--set train.batch_size=6 --set train.hellaswag=hs.jsonl --set train.hellaswag_limit=25 "
          "--set run.dir=run",
      dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto hs = metrics(dir + "/run", "hellaswag_acc_norm");
  ASSERT_EQ(hs.size(), 2u);
  EXPECT_TRUE(hs.count(20) && hs.count(40));
  EXPECT_NE(r.out.find("hellaswag acc "), std::string::npos) << r.out;
  auto e = run_lmforge("eval --checkpoint run --hellaswag hs.jsonl --limit 25", dir);
  ASSERT_EQ(e.exit_code, 0) << e.err;
  const double acc = hs[40]["hellaswag_acc"], acc_norm = hs[40]["hellaswag_acc_norm"];
  std::printf("step 40: hellaswag acc %.4f acc_norm %.4f; eval: %s", acc, acc_norm, e.out.c_str());
  std::smatch m;
  const std::string out = e.out;
  ASSERT_TRUE(std::regex_search(out, m, std::regex("acc ([0-9.]+), acc_norm ([0-9.]+)"))) << out;
  EXPECT_NEAR(std::stod(m[1]), acc, 1.0 / 25 + 1e-9);
  EXPECT_NEAR(std::stod(m[2]), acc_norm, 1.0 / 25 + 1e-9);
  // A file that cannot be read is refused before training starts.
  r = run_lmforge(
      std::string("train ") + kSmall + "--set train.hellaswag=missing.jsonl --set run.dir=bad",
      dir);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("train.hellaswag: missing.jsonl: cannot open"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir + "/bad"));
}

// train.master_weights: bf16. The checkpoints hold the bf16 weights themselves (half the bytes of
// fp32 ones), a resume continues bit for bit (the stochastic rounding is keyed by seed, step and
// index, not by a generator's state), generate reads the checkpoint, and a resume may go back to
// fp32 master weights.
TEST(Training, Bf16MasterWeightsCheckpointAndResumeBitExact) {
  std::string dir = testing::temp_dir("train-bf16-master");
  std::string common = std::string(kSmall) +
                       "--set model.n_layer=2 --set train.steps=12 --set train.checkpoint_every=5 "
                       "--set train.keep_last=0 --set train.eval_every=0 "
                       "--set train.precision=bf16 ";
  // (and the run samples at the end, from bf16 master weights)
  const std::string master =
      "--set train.master_weights=bf16 --set sample.prompt=In --set sample.max_tokens=8 ";
  auto first = run_lmforge("train " + common + master + "--set run.dir=a", dir);
  ASSERT_EQ(first.exit_code, 0) << first.err;
  EXPECT_NE(first.out.find("--- sample ---\nIn"), std::string::npos) << first.out;
  ASSERT_EQ(run_lmforge("train " + common + master + "--set run.dir=b", dir).exit_code, 0);
  ASSERT_EQ(run_lmforge("train " + common + "--set run.dir=f", dir).exit_code, 0);  // fp32 masters
  fs::remove_all(dir + "/b/checkpoints/step-00000012");
  auto r = run_lmforge("train " + common + master + "--set run.dir=b --resume", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto a = metrics(dir + "/a", "loss"), b = metrics(dir + "/b", "loss"),
       f = metrics(dir + "/f", "loss");
  ASSERT_EQ(a.size(), 12u);
  ASSERT_EQ(b.size(), 12u);
  for (auto& [step, j] : a) EXPECT_EQ(j["loss"], b[step]["loss"]) << "step " << step;
  const std::string ckpt = "/checkpoints/step-00000012/model.safetensors";
  EXPECT_EQ(testing::slurp(dir + "/a" + ckpt), testing::slurp(dir + "/b" + ckpt));
  // bf16 weights in the checkpoint, fp32 in the fp32-master run's; the same learning.
  Safetensors sa = Safetensors::open(dir + "/a" + ckpt), sf = Safetensors::open(dir + "/f" + ckpt);
  EXPECT_EQ(sa.info("tok_emb.weight").dtype, "BF16");
  EXPECT_EQ(sf.info("tok_emb.weight").dtype, "F32");
  EXPECT_LT(fs::file_size(dir + "/a" + ckpt), fs::file_size(dir + "/f" + ckpt) * 6 / 10);
  EXPECT_NE(a.at(12)["loss"], f.at(12)["loss"]);
  EXPECT_NEAR(a.at(12)["loss"].get<double>(), f.at(12)["loss"].get<double>(),
              0.03 * f.at(12)["loss"].get<double>());

  auto g = run_lmforge("generate --checkpoint a --prompt 'And God said' --max-tokens 20", dir);
  ASSERT_EQ(g.exit_code, 0) << g.err;
  EXPECT_EQ(g.out.rfind("And God said", 0), 0u);
  // Exported in bf16, the Hugging Face weights are the checkpoint's bits (GPT-2 stores the
  // token embedding as transformer.wte.weight).
  auto e = run_lmforge("export --checkpoint a --to-hf hf --dtype bf16", dir);
  ASSERT_EQ(e.exit_code, 0) << e.err;
  Tensor ours = sa.get("tok_emb.weight"),
         hf = Safetensors::open(dir + "/hf/model.safetensors").get("transformer.wte.weight");
  ASSERT_EQ(hf.nbytes(), ours.nbytes());
  EXPECT_EQ(std::memcmp(hf.raw(), ours.raw(), ours.nbytes()), 0);

  // init_from the fp32-master run's checkpoint with bf16 master weights: the weights load straight
  // into bf16 values (no fp32 copy is made first) and train as the fp32-master run from there does
  // (a value left unwritten or misrounded would show in the first loss).
  const std::string from = "--set init_from=f/checkpoints/step-00000012 --set train.steps=2 ";
  ASSERT_EQ(run_lmforge("train " + common + master + from + "--set run.dir=i", dir).exit_code, 0);
  ASSERT_EQ(run_lmforge("train " + common + from + "--set run.dir=j", dir).exit_code, 0);
  auto i = metrics(dir + "/i", "loss"), jf = metrics(dir + "/j", "loss");
  ASSERT_EQ(i.size(), 2u);
  EXPECT_NEAR(i.at(1)["loss"].get<double>(), jf.at(1)["loss"].get<double>(),
              2e-3 * jf.at(1)["loss"].get<double>());
  EXPECT_LT(i.at(1)["loss"].get<double>(), f.at(1)["loss"].get<double>());  // (trained weights)

  // Back to fp32 master weights from step 10 of the bf16-master run: the bf16 values widen
  // exactly, and training continues.
  fs::copy(dir + "/a", dir + "/c", fs::copy_options::recursive);
  fs::remove_all(dir + "/c/checkpoints/step-00000012");
  r = run_lmforge("train " + common + "--set run.dir=c --resume", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto c = metrics(dir + "/c", "loss");
  ASSERT_EQ(c.size(), 12u);
  // Step 11's forward sees the same weights (widened exactly) and the same data in both runs.
  EXPECT_EQ(c.at(11)["loss"], a.at(11)["loss"]);
  EXPECT_NEAR(c.at(12)["loss"].get<double>(), a.at(12)["loss"].get<double>(),
              0.02 * a.at(12)["loss"].get<double>());
  // And the other way: the fp32-master run resumed with bf16 master weights (rounded once).
  fs::copy(dir + "/f", dir + "/d", fs::copy_options::recursive);
  fs::remove_all(dir + "/d/checkpoints/step-00000012");
  r = run_lmforge("train " + common + master + "--set run.dir=d --resume", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto d = metrics(dir + "/d", "loss");
  ASSERT_EQ(d.size(), 12u);
  EXPECT_NEAR(d.at(12)["loss"].get<double>(), f.at(12)["loss"].get<double>(),
              0.02 * f.at(12)["loss"].get<double>());
  EXPECT_EQ(Safetensors::open(dir + "/d" + ckpt).info("tok_emb.weight").dtype, "BF16");
}

// Bit-exact resume for the Llama family too (RoPE, GQA, SwiGLU, RMSNorm, untied head).
TEST(Training, Llama3TinyResumeIsBitExact) {
  std::string dir = testing::temp_dir("slow-llama-resume");
  std::string common =
      "--set model.preset=llama3-tiny --set model.vocab_size=257 --set data.text=demo:kjv "
      "--set data.tokenizer=byte "
      "--set train.batch_size=4 --set train.seq_len=64 --set train.steps=30 "
      "--set train.checkpoint_every=10 --set train.keep_last=0 --set train.eval_every=15 "
      "--set sample.prompt= ";
  ASSERT_EQ(run_lmforge("train " + common + "--set run.dir=a", dir).exit_code, 0);
  ASSERT_EQ(run_lmforge("train " + common + "--set run.dir=b", dir).exit_code, 0);
  fs::remove_all(dir + "/b/checkpoints/step-00000030");
  fs::remove_all(dir + "/b/checkpoints/step-00000020");
  auto r = run_lmforge("train " + common + "--set run.dir=b --resume", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto a = testing::records_of(dir + "/a/metrics.jsonl", "loss"),
       b = testing::records_of(dir + "/b/metrics.jsonl", "loss");
  ASSERT_EQ(a.size(), 30u);
  ASSERT_EQ(b.size(), 30u);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i]["loss"], b[i]["loss"]) << "step " << i + 1;
  EXPECT_EQ(testing::records_of(dir + "/a/metrics.jsonl", "val_loss"),
            testing::records_of(dir + "/b/metrics.jsonl", "val_loss"));
  EXPECT_EQ(testing::slurp(dir + "/a/checkpoints/step-00000030/model.safetensors"),
            testing::slurp(dir + "/b/checkpoints/step-00000030/model.safetensors"));
}

// A real tokenizer end to end: the vocabulary comes from it (padded to 64), the checkpoint
// carries its files, and generate decodes with them.
TEST(Training, TiktokenTokenizerFlowsIntoCheckpointAndGenerate) {
  std::string dir = testing::temp_dir("train-tiktoken");
  std::string tok = testing::shared_tokenizers_dir() + "/gpt2.tiktoken";
  ASSERT_TRUE(fs::exists(tok)) << tok;
  auto r = run_lmforge(
      "train --set model.preset=gpt2-tiny --set model.n_layer=1 "
      "--set model.vocab_size=0 --set data.text=demo:kjv --set data.tokenizer=" +
          tok +
          " --set train.steps=3 --set train.batch_size=2 --set train.seq_len=32 "
          "--set train.eval_every=0 --set sample.prompt= --set run.dir=run",
      dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::string ckpt = dir + "/run/checkpoints/step-00000003";
  EXPECT_TRUE(fs::exists(ckpt + "/tokenizer/gpt2.tiktoken"));
  EXPECT_TRUE(fs::exists(ckpt + "/tokenizer/gpt2.json"));
  auto state = nlohmann::json::parse(testing::slurp(ckpt + "/state.json"));
  EXPECT_EQ(state["tokenizer"]["vocab_size"], 50257);
  EXPECT_EQ(state["model"]["vocab_size"], "50304");  // padded to a multiple of 64
  auto g = run_lmforge("generate --checkpoint run --prompt 'And God said' --max-tokens 8", dir);
  ASSERT_EQ(g.exit_code, 0) << g.err;
  EXPECT_EQ(g.out.rfind("And God said", 0), 0u) << g.out;
}

// The sample a run prints at its end is what generate draws from its checkpoint with the same
// seed and options: over a vocabulary padded past the tokenizer's (257 byte ids of 320), at a
// temperature that makes every id likely, neither samples a padding id (they print nothing: the
// sample came out short) nor stops at one.
TEST(Training, EndSampleIsGeneratesSample) {
  std::string dir = testing::temp_dir("train-sample");
  auto r = run_lmforge(
      "train --set model.preset=gpt2-tiny --set model.n_layer=1 --set model.vocab_size=0 "
      "--set model.max_seq_len=64 --set data.text=demo:kjv --set data.tokenizer=byte "
      "--set train.steps=2 --set train.batch_size=2 --set train.seq_len=32 "
      "--set train.eval_every=0 --set train.seed=5 --set sample.prompt=The "
      "--set sample.max_tokens=50 --set sample.temperature=100 --set sample.top_p=1 "
      "--set run.dir=run",
      dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string begin = "--- sample ---\n", end = "\n--------------\n";
  const size_t from = r.out.find(begin);
  ASSERT_NE(from, std::string::npos) << r.out;
  const size_t to = r.out.find(end, from + begin.size());
  ASSERT_NE(to, std::string::npos) << r.out;
  const std::string sample = r.out.substr(from + begin.size(), to - from - begin.size());
  auto g = run_lmforge(
      "generate --checkpoint run --prompt The --max-tokens 50 --temperature 100 --seed 5", dir);
  ASSERT_EQ(g.exit_code, 0) << g.err;
  EXPECT_EQ(g.out, sample + "\n");
  if (!sample.ends_with("<|endoftext|>")) {  // a byte per token: every one of them printed
    EXPECT_EQ(sample.size(), 3u + 50u) << sample;
  }
}

// data.tokenizer=bpe:N trains a BPE on data.text (as the embedded default does); the checkpoint
// carries it and generate decodes with it.
TEST(Training, TrainsItsOwnBpeOnDataText) {
  std::string dir = testing::temp_dir("train-bpe");
  std::string common =
      "train --set model.preset=gpt2-tiny --set model.n_layer=1 --set model.vocab_size=0 "
      "--set data.text=demo:kjv --set train.steps=2 --set train.batch_size=2 "
      "--set train.seq_len=32 --set train.eval_every=0 --set sample.prompt= ";
  auto r = run_lmforge(common + "--set data.tokenizer=bpe:400 --set run.dir=run", dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("V=448"), std::string::npos) << r.out;  // 400 padded to 64
  EXPECT_TRUE(fs::exists(dir + "/run/checkpoints/step-00000002/tokenizer/tokenizer.json"));
  auto g = run_lmforge("generate --checkpoint run --prompt 'And God' --max-tokens 5", dir);
  ASSERT_EQ(g.exit_code, 0) << g.err;
  EXPECT_EQ(g.out.rfind("And God", 0), 0u);
  auto bad = run_lmforge(common + "--set data.tokenizer=bpe:10 --set run.dir=run2", dir);
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.err.find("bpe:N with N >= 257"), std::string::npos) << bad.err;
}

// bpe:N learns from data.text's training share alone: the held-out share that validates the run
// is text its tokenizer never saw (it learnt that share's words before). The run's tokenizer is
// the one `tokenizer train` makes from a file of the first half (two halves of equal bytes,
// data.val_fraction 0.5: the cut falls between them). plan then takes its vocabulary.
TEST(Training, OwnBpeLearnsFromTheTrainingShareAlone) {
  std::string dir = testing::temp_dir("train-bpe-share");
  std::string first, second;
  for (int i = 0; i < 100; ++i) {
    first += "the cat sat on a mat\n";
    second += "zyxwv qponm lkjih gf\n";
  }
  ASSERT_EQ(first.size(), second.size());
  std::ofstream(dir + "/text.txt") << first << second;
  std::ofstream(dir + "/first.txt") << first;
  const std::string sets =
      " --set model.preset=gpt2-tiny --set model.n_layer=1 --set model.vocab_size=0 "
      "--set data.text=text.txt --set data.val_fraction=0.5 --set data.tokenizer=bpe:400 "
      "--set train.steps=1 --set train.batch_size=2 --set train.seq_len=8 --set train.eval_every=0 "
      "--set sample.prompt= --set run.dir=run";
  // plan: the vocabulary is at most N (padded) until a run has trained the tokenizer, then the
  // run's (its merges ran out before N on this text)
  auto vocab = [](const std::string& out) {
    const size_t at = out.find(" V=");
    return at == std::string::npos ? std::string()
                                   : out.substr(at + 1, out.find_first_of(" ;", at + 1) - at - 1);
  };
  auto before = run_lmforge("plan" + sets, dir);
  ASSERT_EQ(before.exit_code, 0) << before.err;
  EXPECT_EQ(vocab(before.out), "V=448") << before.out;
  auto r = run_lmforge("train" + sets, dir);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto after = run_lmforge("plan" + sets, dir);
  ASSERT_EQ(after.exit_code, 0) << after.err;
  ASSERT_NE(vocab(r.out), "");
  EXPECT_NE(vocab(r.out), "V=448") << r.out;
  EXPECT_EQ(vocab(after.out), vocab(r.out)) << after.out;
  auto t = run_lmforge("tokenizer train --vocab-size 400 --out tok first.txt", dir);
  ASSERT_EQ(t.exit_code, 0) << t.err;
  const std::string trained =
      testing::slurp(dir + "/run/checkpoints/step-00000001/tokenizer/tokenizer.json");
  ASSERT_FALSE(trained.empty());
  EXPECT_EQ(trained, testing::slurp(dir + "/tok/tokenizer.json"));
  EXPECT_EQ(trained.find("zy"), std::string::npos);  // no merge of the held-out share's letters
}

}  // namespace lmforge
