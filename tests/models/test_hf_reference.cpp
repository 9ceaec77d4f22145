// Hugging Face interop against transformers itself (tests/reference/hf_models_ref.py):
//   import  a tiny random model per family saved by save_pretrained (fp32, sharded, bf16) loads
//           into lmforge with the same logits and loss, and generates greedily the same ids;
//   export  a random lmforge model per family, exported, loads with AutoModelForCausalLM with the
//           same logits, its tokenizer with AutoTokenizer with the same ids, and imports back
//           bit-identically;
//   CLI     convert -> info -> export round trip, generate and train from init_from.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <nlohmann/json.hpp>
#include <sstream>

#include "lmforge/core/rng.h"
#include "lmforge/data/text_shards.h"
#include "lmforge/eval/generate.h"
#include "lmforge/io/config.h"
#include "lmforge/models/hf.h"
#include "lmforge/nn/transformer.h"
#include "lmforge/tokenizer/tokenizer.h"
#include "testing/compare.h"
#include "testing/process.h"

namespace lmforge {
namespace {

namespace fs = std::filesystem;
namespace t = lmforge::testing;
using nlohmann::json;

// Normalised logits error of lmforge's fp32 model against transformers' fp32 model (the issue's
// bar); observed errors are ~1e-6.
constexpr double kTol = 1e-4;

// Must equal hf_models_ref.py's CASES + SAVES (checked against cases.json).
const std::vector<std::string> kCases = {
    "gemma",    "gemma2", "gemma3",         "gemma3_mm",  "gemma3_mm_renamed",
    "gpt2",     "llama3", "llama3_sharded", "llama_bias", "mistral",
    "phi3",     "qwen2",  "qwen3",          "qwen3_bf16", "smollm",
    "tinyllama"};
const std::map<std::string, std::string> kArchitecture = {
    {"gpt2", "GPT2LMHeadModel"},       {"llama", "LlamaForCausalLM"},
    {"mistral", "MistralForCausalLM"}, {"qwen2", "Qwen2ForCausalLM"},
    {"qwen3", "Qwen3ForCausalLM"},     {"phi3", "Phi3ForCausalLM"},
    {"gemma", "GemmaForCausalLM"},     {"gemma2", "Gemma2ForCausalLM"},
    {"gemma3", "Gemma3ForCausalLM"}};

std::string hf_dir(const std::string& c = "") { return t::ref_dir() + "/hf_models/" + c; }

Tensor run_logits(Transformer& model, const Tensor& tokens, const Tensor& targets, float* loss) {
  model.plan(tokens.size(0), tokens.size(1), Recompute::kNone, /*keep_logits=*/true);
  *loss = model.forward(tokens, targets);
  return model.logits();
}

std::string config_diff(const ModelConfig& a, const ModelConfig& b) {
  ModelConfig x = a, y = b;
  auto fa = model_fields(x), fb = model_fields(y);
  std::string d;
  for (size_t i = 0; i < fa.size(); ++i)
    if (fa[i].key != "preset" && field_value(fa[i]) != field_value(fb[i]))
      d += fmt::format("{}: {} vs {}; ", fa[i].key, field_value(fa[i]), field_value(fb[i]));
  return d;
}

TEST(HfFixtures, CaseListMatchesTheFixtures) {
  json j = json::parse(t::slurp(hf_dir("cases.json")));
  EXPECT_EQ(j.get<std::vector<std::string>>(), kCases);
}

class HfImport : public ::testing::TestWithParam<std::string> {};

TEST_P(HfImport, LogitsAndLossMatchTransformers) {
  const std::string dir = hf_dir(GetParam());
  HfConfig hc = read_hf_config(dir);
  // (a multimodal Gemma 3's vision tower: noted as not imported)
  EXPECT_EQ(hc.notes.size(), GetParam().starts_with("gemma3_mm") ? 1u : 0u)
      << (hc.notes.empty() ? "" : hc.notes.front());
  Transformer model(hc.model);
  load_hf_weights(model, dir);
  Safetensors ref = Safetensors::open(dir + "/ref.safetensors");
  float loss = 0;
  Tensor logits = run_logits(model, ref.get("tokens"), ref.get("targets"), &loss);
  EXPECT_TRUE(t::tensors_close(GetParam() + " logits", logits, ref.get("logits"), kTol));
  EXPECT_NEAR(loss, ref.get("loss").data<float>()[0], 1e-4 * std::abs(loss));
}

// The loss's gradient with respect to every weight against transformers' autograd (each lmforge
// parameter's rows against the HF tensors they hold: q/k/v, gate/up, GPT-2's transposed Conv1D;
// a tied head's gradient is the embedding's). Backward through every family's layers: Gemma's
// scaled embeddings, GeGLU, post norms and per-layer windows and RoPE bases included.
TEST_P(HfImport, GradientsMatchTransformers) {
  const std::string dir = hf_dir(GetParam());
  Transformer model(read_hf_config(dir).model);
  load_hf_weights(model, dir);
  Safetensors ref = Safetensors::open(dir + "/ref.safetensors");
  const Tensor tokens = ref.get("tokens");
  model.plan(tokens.size(0), tokens.size(1), Recompute::kNone);
  model.params().zero_grad();
  model.forward_backward(tokens, ref.get("targets"));
  int64_t compared = 0;
  for (const Param& p : model.params().params()) {
    const int64_t rows = p.shape[0], cols = p.shape.numel() / rows;
    const Tensor g = p.grad.to(DType::kF32);
    for (const HfPiece& piece : hf_pieces(model.config(), p.name, rows)) {
      const std::string key = "grad." + piece.name;
      if (!ref.has(key)) continue;  // (a stored copy: GPT-2's unprefixed names are not)
      Tensor want = ref.get(key);
      if (piece.transpose) {  // HF's (in, out) Conv1D: ours is its transpose
        Tensor t = Tensor::empty({piece.rows, cols}, DType::kF32);
        for (int64_t r = 0; r < piece.rows; ++r)
          for (int64_t c = 0; c < cols; ++c)
            t.data<float>()[r * cols + c] = want.data<float>()[c * piece.rows + r];
        want = t;
      }
      const Tensor got = g.slice(piece.row0, piece.rows).clone();
      EXPECT_TRUE(t::tensors_close(GetParam() + " " + key, got.view(want.shape()), want, kTol));
      ++compared;
    }
  }
  EXPECT_GE(compared, static_cast<int64_t>(model.params().params().size()));
}

// Greedy generation (lmforge's KV cache: the prompt through the tiled attention, then one token
// at a time through the matrix-vector kernels) against transformers' generate with its own
// cache: the same ids at every step whose choice is not within 1e-3 of a tie (none is, in these
// fixtures; the test insists on 12 steps at least).
TEST_P(HfImport, GreedyGenerationMatchesTransformers) {
  const std::string dir = hf_dir(GetParam());
  Transformer model(read_hf_config(dir).model);
  load_hf_weights(model, dir);
  Safetensors ref = Safetensors::open(dir + "/ref.safetensors");
  const Tensor prompt = ref.get("gen_prompt"), ids = ref.get("gen_ids"),
               margin = ref.get("gen_margin");
  SamplingOptions o;
  o.temperature = 0;
  o.max_tokens = ids.numel();
  const std::vector<int32_t> got = generate(
      model, std::vector<int32_t>(prompt.data<int32_t>(), prompt.data<int32_t>() + prompt.numel()),
      o);
  ASSERT_EQ(static_cast<int64_t>(got.size()), ids.numel());
  int64_t clear = 0;  // steps before the first near-tie
  while (clear < ids.numel() && margin.data<float>()[clear] > 1e-3f) ++clear;
  ASSERT_GE(clear, 12) << "the fixture's choices are too close to call";
  for (int64_t i = 0; i < clear; ++i)
    ASSERT_EQ(got[i], ids.data<int32_t>()[i]) << GetParam() << " step " << i;
}

INSTANTIATE_TEST_SUITE_P(Families, HfImport, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return info.param; });

// Random weights of lmforge's own, norms and biases included, so every tensor matters (norms
// scaling by about 1: Gemma's weights about 0).
void randomize(Transformer& model, uint64_t seed) {
  Rng rng(seed);
  const double norm_center = 1.0 - model.config().norm_offset;
  for (Param& p : model.params().params()) {
    bool norm = p.name.find("norm") != std::string::npos;
    float* w = p.value.data<float>();
    for (int64_t i = 0; i < p.value.numel(); ++i)
      w[i] = static_cast<float>(norm ? norm_center + 0.2 * rng.normal() : 0.1 * rng.normal());
  }
}

// bf16 master weights made before the load (train.master_weights: bf16 with init_from: the fp32
// values never made) hold the bits the fp32 load converted afterwards holds, LoRA adapters' initial
// values included.
TEST(HfImport, LoadIntoBf16MasterWeightsIsTheConvertedLoad) {
  ModelConfig mc = read_hf_config(hf_dir("gemma2")).model;
  mc.lora.rank = 4;
  Transformer early(mc), late(mc);
  early.use_bf16_master(/*convert=*/false);
  for (Transformer* m : {&early, &late}) {
    m->init_adapters(3);
    load_hf_weights(*m, hf_dir("gemma2"));
  }
  late.use_bf16_master();
  const Tensor a = early.params().flat_values(), b = late.params().flat_values();
  ASSERT_EQ(a.dtype(), DType::kBF16);
  ASSERT_EQ(a.nbytes(), b.nbytes());
  EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0);
}

TEST(HfExport, TransformersLoadsExportedModelsWithTheSameLogitsAndTokens) {
  const std::string root = t::temp_dir("hf-export");
  const std::string corpus =
      "In the beginning God created the heaven and the earth.\n  And the earth was without form, "
      "and void; 1234567 <|endoftext|> caf\xc3\xa9 \xe2\x80\x94 \xe4\xbd\xa0\xe5\xa5\xbd!\n\n";
  auto tok = load_tokenizer(hf_dir("tokenizer.json"));
  std::vector<std::string> dirs;
  std::map<std::string, std::unique_ptr<Transformer>> models;
  uint64_t seed = 7;
  // llama3_lora: Llama 3 with LoRA adapters on every layer kind, exported merged. *_peft: the
  // base model without them, and the adapters as a PEFT adapter in <dir>/adapter, which the
  // reference applies as PEFT merges them (W += alpha / r * B A, transposed for GPT-2's Conv1D).
  // gemma3_full: Gemma 3 with full attention on every layer.
  for (const std::string c :
       {"gpt2", "llama3", "tinyllama", "smollm", "llama_bias", "mistral", "qwen2", "qwen3", "phi3",
        "gemma", "gemma2", "gemma3", "gemma3_mm", "llama3_lora", "llama3_peft", "gpt2_peft",
        "gemma3_peft", "gemma3_full"}) {
    const bool peft = c.ends_with("_peft");
    // (gemma3_mm: the multimodal model's text model, with linear RoPE scaling, exported as
    // Gemma3ForCausalLM)
    const std::string src =
        c == "gemma3_mm" ? c : c.substr(0, c.find('_', c.starts_with("llama_") ? 6 : 0));
    ModelConfig mc = read_hf_config(hf_dir(src)).model;
    if (c == "llama3_lora" || peft) mc.lora.rank = 4;
    if (c == "gemma3_full") {  // no layer windows (transformers' Gemma 3 still needs a window)
      mc.sliding_window = mc.full_attention_every = 0;
      mc.rope_local_theta = 0;
    }
    auto& model = models[c] = std::make_unique<Transformer>(mc);
    randomize(*model, seed++);
    std::string out = root + "/" + c;
    // Small shards for one family, so the index path is exercised too.
    save_hf_model(*model, tok.get(), out, DType::kF32, c == "llama3" ? 50'000 : 5'000'000'000,
                  /*merge_lora=*/!peft);
    if (peft) save_peft_adapter(*model, out + "/adapter", "", DType::kF32);
    fs::copy_file(hf_dir(src) + "/ref.safetensors", out + "/tokens.safetensors");
    std::ofstream(out + "/corpus.txt") << corpus;
    dirs.push_back(out);
  }
  EXPECT_TRUE(fs::exists(root + "/llama3/model.safetensors.index.json"));
  std::string cmd =
      "'" + t::python() + "' '" + t::source_dir() + "/tests/reference/hf_models_ref.py' check";
  for (auto& d : dirs) cmd += " '" + d + "'";
  ASSERT_EQ(std::system((cmd + " > '" + root + "/python.log' 2>&1").c_str()), 0)
      << t::slurp(root + "/python.log");

  std::vector<int32_t> ours = tok->encode(corpus, true);
  int64_t padded_wins = 0;  // steps whose raw argmax in transformers was a padding id
  for (auto& [c, ptr] : models) {
    SCOPED_TRACE(c);
    Transformer& model = *ptr;
    const std::string d = root + "/" + c;
    Safetensors ref = Safetensors::open(d + "/tokens.safetensors");
    float loss = 0;
    Tensor logits = run_logits(model, ref.get("tokens"), ref.get("targets"), &loss);
    Safetensors hf = Safetensors::open(d + "/hf_logits.safetensors");
    EXPECT_TRUE(t::tensors_close(c + " exported logits", logits, hf.get("logits"), kTol));
    // transformers' greedy generate, under the export's generation_config, picks lmforge's ids:
    // never one past the tokenizer's (the padding of V = 320 over its ids).
    {
      SamplingOptions o;
      o.temperature = 0;
      o.vocab_limit = tok->vocab_size();
      const Tensor ids = hf.get("gen_ids"), margin = hf.get("gen_margin");
      o.max_tokens = ids.numel();
      const Tensor tokens = ref.get("tokens");
      const std::vector<int32_t> got = generate(
          model, std::vector<int32_t>(tokens.data<int32_t>(), tokens.data<int32_t>() + 6), o);
      ASSERT_EQ(static_cast<int64_t>(got.size()), ids.numel());
      for (int64_t i = 0; i < ids.numel() && margin.data<float>()[i] > 1e-3f; ++i)
        ASSERT_EQ(got[i], ids.data<int32_t>()[i]) << c << " step " << i;
      padded_wins += hf.get("gen_padded_wins").data<int32_t>()[0];
    }
    json j = json::parse(t::slurp(d + "/hf_tokens.json"));
    EXPECT_EQ(j.at("class").get<std::string>(), kArchitecture.at(model.config().arch));
    EXPECT_EQ(j.at("ids").get<std::vector<int32_t>>(), ours);

    // Round trip: the export imports back bit for bit (LoRA's: merged, checked above).
    if (model.config().lora.on()) continue;  // (a PEFT adapter's config is checked in Python)
    HfConfig back = read_hf_config(d);
    EXPECT_EQ(config_diff(back.model, model.config()), "");
    Transformer again(back.model);
    load_hf_weights(again, d);
    for (size_t i = 0; i < model.params().params().size(); ++i) {
      const Tensor& a = model.params().params()[i].value;
      const Tensor& b = again.params().params()[i].value;
      EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0) << model.params().params()[i].name;
    }
  }
  EXPECT_GT(padded_wins, 0) << "no padding id would have been picked: the check above is idle";
}

// The commands end to end: convert a sharded HF model, describe it, sample from it, fine-tune
// from it, and export it back: the weights come back bit-identical to what transformers saved.
TEST(HfCli, ConvertInfoGenerateTrainExport) {
  const std::string root = t::temp_dir("hf-cli");
  const std::string src = hf_dir("llama3_sharded");
  auto r = t::run_lmforge("convert --from-hf '" + src + "' --out run", root);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = t::run_lmforge("info run", root);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("architecture: llama"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("init_from hf:" + src), std::string::npos) << r.out;
  ModelConfig mc = read_hf_config(src).model;
  EXPECT_NE(r.out.find("parameters:   " + std::to_string(mc.num_params())), std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("dtype:        F32\n"), std::string::npos) << r.out;
  // The converted checkpoint is weights-only: it consolidates (copies) all the same.
  r = t::run_lmforge("convert --from-checkpoint run --out copy", root);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(t::slurp(root + "/copy/checkpoints/step-00000000/model.safetensors"),
            t::slurp(root + "/run/checkpoints/step-00000000/model.safetensors"));
  r = t::run_lmforge("info '" + src + "'", root);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("Hugging Face (12 files)"), std::string::npos) << r.out;

  r = t::run_lmforge("generate --checkpoint run --prompt 'In the' --max-tokens 5 --seed 1", root);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // Straight from the HF directory: the same samples as from the converted checkpoint, in fp32
  // and in bf16 (rounded on load either way); --stats on stderr.
  for (const std::string p : {"fp32", "bf16"}) {
    const std::string flags =
        " --prompt 'In the' --max-tokens 8 --seed 3 --ignore-eos --precision " + p;
    auto a = t::run_lmforge("generate --checkpoint run" + flags, root);
    auto b = t::run_lmforge("generate --checkpoint hf:'" + src + "'" + flags + " --stats", root);
    ASSERT_EQ(a.exit_code, 0) << a.err;
    ASSERT_EQ(b.exit_code, 0) << b.err;
    EXPECT_EQ(a.out, b.out) << p;
    EXPECT_NE(b.err.find("8 new tokens in"), std::string::npos) << b.err;
  }

  r = t::run_lmforge("export --checkpoint run --to-hf out", root);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  SafetensorsSet orig = SafetensorsSet::open(src), back = SafetensorsSet::open(root + "/out");
  EXPECT_EQ(orig.names().size(), back.names().size());
  for (const std::string& n : orig.names()) {
    ASSERT_TRUE(back.has(n)) << n;
    Tensor a = orig.get(n), b = back.get(n);
    EXPECT_TRUE(a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0) << n;
  }
  // The tokenizer's metadata (EOS and pad names, length, chat template) travels with it.
  EXPECT_EQ(t::slurp(root + "/out/tokenizer_config.json"),
            t::slurp(src + "/tokenizer_config.json"));
  r = t::run_lmforge("export --checkpoint run --to-hf out", root);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--force"), std::string::npos) << r.err;
  // out/ names the same directory: replaced in place, its temporary beside it, not inside.
  r = t::run_lmforge("export --checkpoint run --to-hf out/ --force", root);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(SafetensorsSet::open(root + "/out").names().size(), orig.names().size());
  for (const auto& e : std::filesystem::directory_iterator(root))  // (out.lmforge-export.*.tmp)
    EXPECT_FALSE(e.path().filename().string().ends_with(".tmp")) << e.path();
  EXPECT_FALSE(std::filesystem::exists(root + "/out/.tmp"));

  // Fine-tune from the HF directory on a small text; the run records where it started.
  std::ofstream(root + "/text.txt") << "In the beginning God created the heaven and the earth.\n";
  r = t::run_lmforge("train --set init_from=hf:'" + src +
                         "' --set data.text=text.txt --set data.val_fraction=0 "
                         "--set train.steps=2 --set train.batch_size=1 --set train.seq_len=8 "
                         "--set train.eval_every=0 --set run.dir=ft",
                     root);
  ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  EXPECT_NE(r.out.find("init_from hf:" + src), std::string::npos) << r.out;
  r = t::run_lmforge("info ft", root);
  EXPECT_NE(r.out.find("init_from hf:" + src), std::string::npos) << r.out;
  // The architecture comes from init_from: a conflicting model key is one clear error.
  r = t::run_lmforge("train --set init_from=hf:'" + src +
                         "' --set model.n_layer=3 --set data.text=text.txt --set run.dir=bad",
                     root);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("model.n_layer"), std::string::npos) << r.err;
}

// generate from hf:DIR stops where transformers' generate does: at any id of
// generation_config.json's eos_token_id (a list in Llama 3 Instruct, Gemma 2), not only at the
// tokenizer's EOS. Here the list names the greedy reply's first token, so the reply stops at once.
// --allow-special reads a special token's text in the prompt as the token, as transformers'
// tokenizer does.
TEST(HfCli, GenerateStopsAtTheModelsEndIdsAndReadsSpecialsOnRequest) {
  const std::string root = t::temp_dir("hf-stop");
  std::filesystem::copy(hf_dir("llama3"), root + "/hf", std::filesystem::copy_options::recursive);
  std::ofstream(root + "/p.jsonl") << "{\"prompt\": \"In the\"}\n";
  const std::string gen =
      "generate --checkpoint hf:hf --prompts p.jsonl --temperature 0 --max-tokens ";
  auto tok = load_tokenizer(root + "/hf");
  const HfConfig hc = read_hf_config(root + "/hf");
  Transformer model(hc.model);
  load_hf_weights(model, root + "/hf");
  SamplingOptions greedy;
  greedy.temperature = 0;
  greedy.max_tokens = 1;
  const int32_t first = generate(model, tok->encode("In the", false, true), greedy).at(0);
  auto r = t::run_lmforge(gen + "6", root);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out).at("finish_reason"), "length") << r.out;
  json g = json::parse(t::slurp(root + "/hf/generation_config.json"));
  g["eos_token_id"] = {tok->eos_id(), first};
  g["pad_token_id"] = 0;
  std::ofstream(root + "/hf/generation_config.json") << g.dump();
  r = t::run_lmforge(gen + "6", root);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out).at("finish_reason"), "stop") << r.out;
  EXPECT_EQ(json::parse(r.out).at("completion"), "") << r.out;
  // Converted, the checkpoint keeps the model's generation_config.json with its tokenizer:
  // generate from it stops alike, and an export writes it again.
  r = t::run_lmforge("convert --from-hf hf --out ck", root);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = t::run_lmforge("generate --checkpoint ck --prompts p.jsonl --temperature 0 --max-tokens 6",
                     root);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(r.out).at("finish_reason"), "stop") << r.out;
  r = t::run_lmforge("export --checkpoint ck --to-hf out", root);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(t::slurp(root + "/out/generation_config.json")).at("eos_token_id"),
            g["eos_token_id"]);
  // ... and its ids in config.json (the tokenizer alone knows one EOS and no pad).
  const json exported = json::parse(t::slurp(root + "/out/config.json"));
  EXPECT_EQ(exported.at("eos_token_id"), g["eos_token_id"]);
  EXPECT_EQ(exported.at("pad_token_id"), 0);

  // The special token's text: one id with --allow-special, its characters without.
  const std::string special = tok->decode({tok->eos_id()});
  std::ofstream(root + "/s.jsonl") << json({{"prompt", "In the" + special}}).dump() << "\n";
  const std::string plain =
      "generate --checkpoint hf:hf --prompts s.jsonl --temperature 0 "
      "--ignore-eos --max-tokens 4";
  auto a = t::run_lmforge(plain, root), b = t::run_lmforge(plain + " --allow-special", root);
  ASSERT_EQ(a.exit_code, 0) << a.err;
  ASSERT_EQ(b.exit_code, 0) << b.err;
  ASSERT_GT(tok->encode(special, false).size(), 1u);  // as text: several ids
  EXPECT_NE(json::parse(a.out).at("completion"), json::parse(b.out).at("completion"));
}

// lmforge eval --hellaswag against transformers (hellaswag_ref.py): HellaSwag-format examples made
// from the King James Bible (a verse's first words, then its next words and three other verses'
// as the endings; one label written as a string, as the Hugging Face copy has them; one context
// longer than the model's, cut from the left), scored by GPT-2-, Llama- and Gemma-family models
// converted from transformers (Gemma 2's with a tokenizer whose post-processor adds a BOS, as
// Gemma's does: both sides start its choices with it, as lm-eval-harness does). Every ending's
// log-likelihood and token count agrees, and so do the predictions; bad files are one clear error
// naming the line.
TEST(HellaSwag, ScoresMatchTransformers) {
  const std::string root = t::temp_dir("hellaswag");
  std::vector<std::vector<std::string>> verses;  // words of the corpus's longer lines
  std::ifstream text(demo_corpus_path());
  for (std::string line; std::getline(text, line) && verses.size() < 200;) {
    std::istringstream ws(line);
    std::vector<std::string> words{std::istream_iterator<std::string>(ws), {}};
    if (words.size() >= 10) verses.push_back(words);
  }
  ASSERT_EQ(verses.size(), 200u);
  auto join = [](const std::vector<std::string>& w, size_t a, size_t b) {
    std::string s;
    for (size_t i = a; i < b && i < w.size(); ++i) s += (i > a ? " " : "") + w[i];
    return s;
  };
  {
    std::ofstream items(root + "/items.jsonl");
    for (int i = 0; i < 16; ++i) {
      std::vector<std::string> endings;
      for (int k = 0; k < 4; ++k) endings.push_back(join(verses[(i + 37 * k) % 200], 4, 7));
      const int label = i % 4;
      std::swap(endings[0], endings[label]);
      json j = {{"ctx", join(verses[i], 0, 4)}, {"endings", endings}, {"label", label}};
      if (i == 3) j["label"] = std::to_string(label);
      items << j.dump() << "\n";
    }
    std::string long_ctx;
    for (int k = 0; k < 6; ++k) long_ctx += join(verses[50 + k], 0, 12) + " ";
    items << json({{"ctx", long_ctx},
                   {"endings", {"and it was so.", "in the garden.", "of the earth.", "my son"}},
                   {"label", 0}})
                 .dump()
          << "\n";
  }
  // The Gemma 2 model with its tokenizer's BOS.
  const std::string gemma = root + "/gemma2-bos";
  std::filesystem::copy(hf_dir("gemma2"), gemma);
  json tj = json::parse(t::slurp(gemma + "/tokenizer.json"));
  const json bos = {{"SpecialToken", {{"id", "<|endoftext|>"}, {"type_id", 0}}}};
  tj["post_processor"]["single"].insert(tj["post_processor"]["single"].begin(), bos);
  int bos_id = -1;
  for (const json& a : tj["added_tokens"])
    if (a["content"] == "<|endoftext|>") bos_id = a["id"].get<int>();
  ASSERT_GE(bos_id, 0);
  tj["post_processor"]["special_tokens"] = {
      {"<|endoftext|>",
       {{"id", "<|endoftext|>"}, {"ids", {bos_id}}, {"tokens", {"<|endoftext|>"}}}}};
  std::ofstream(gemma + "/tokenizer.json") << tj.dump();
  for (const std::string c : {"gpt2", "llama3", "gemma2"}) {
    SCOPED_TRACE(c);
    const std::string src = c == "gemma2" ? gemma : hf_dir(c);
    auto r = t::run_lmforge("convert --from-hf '" + src + "' --out " + c, root);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = t::run_lmforge(
        "eval --checkpoint " + c + " --hellaswag items.jsonl --scores " + c + ".jsonl", root);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("hellaswag: 17 examples, acc "), std::string::npos) << r.out;
    if (c == "gpt2") {  // hf:DIR read as convert reads it: the same scores
      r = t::run_lmforge(
          "eval --checkpoint 'hf:" + src + "' --hellaswag items.jsonl --scores hf-gpt2.jsonl",
          root);
      ASSERT_EQ(r.exit_code, 0) << r.err;
      EXPECT_TRUE(t::slurp(root + "/hf-gpt2.jsonl") == t::slurp(root + "/gpt2.jsonl"));
    }
    const std::string cmd = "'" + t::python() + "' '" + t::source_dir() +
                            "/tests/reference/hellaswag_ref.py' '" + src + "' '" + root +
                            "/items.jsonl' '" + root + "/" + c + ".jsonl' > '" + root + "/" + c +
                            ".log' 2>&1";
    EXPECT_EQ(std::system(cmd.c_str()), 0) << t::slurp(root + "/" + c + ".log");
    std::printf("%s: %s", c.c_str(), t::slurp(root + "/" + c + ".log").c_str());
  }
  // Bad input: the file and line, the field.
  std::ofstream(root + "/bad.jsonl")
      << json({{"ctx", "In the"}, {"endings", {"a", "b"}}, {"label", 0}}).dump()
      << "\n{\"ctx\": \"x\", \"endings\": [\"a\", \"b\"], \"label\": 2}\n";
  auto r = t::run_lmforge("eval --checkpoint gpt2 --hellaswag bad.jsonl", root);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("bad.jsonl:2: \"label\" must be the index of one of its 2 endings"),
            std::string::npos)
      << r.err;
  std::ofstream(root + "/notjson.jsonl") << "{\"ctx\": \n";
  r = t::run_lmforge("eval --checkpoint gpt2 --hellaswag notjson.jsonl", root);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("notjson.jsonl:1: not JSON"), std::string::npos) << r.err;
  r = t::run_lmforge("eval --checkpoint gpt2 --hellaswag missing.jsonl", root);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("missing.jsonl: cannot open"), std::string::npos) << r.err;
  // --scores naming a directory: said before the scoring, not after it.
  std::filesystem::create_directories(root + "/scored");
  r = t::run_lmforge("eval --checkpoint gpt2 --hellaswag items.jsonl --scores scored", root);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--scores: scored is a directory"), std::string::npos) << r.err;
}

// PEFT LoRA adapters made by hf_models_ref.py (not by lmforge), merged on import: the logits of
// transformers with the adapter merged as PEFT merges it. Llama 3's adapter is on q_proj and
// v_proj apart (lmforge fuses q/k/v: their rows of it) and down_proj, with rsLoRA's scaling;
// GPT-2's on its Conv1D c_attn and mlp.c_proj (fan_in_fan_out). Then `convert --peft` writes the
// same weights, and what cannot be merged exactly is one clear error.
TEST(HfPeftImport, MergedAdaptersMatchTransformers) {
  for (const std::string c : {"llama3_peftin", "gpt2_peftin"}) {
    SCOPED_TRACE(c);
    const std::string base = hf_dir(c.substr(0, c.find('_')));
    Transformer model(read_hf_config(base).model);
    load_hf_weights(model, base);
    Safetensors ref = Safetensors::open(hf_dir(c) + "/ref.safetensors");
    float loss = 0;
    const Tensor before = run_logits(model, ref.get("tokens"), ref.get("targets"), &loss).clone();
    merge_peft_adapter(model, hf_dir(c) + "/adapter");
    const Tensor logits = run_logits(model, ref.get("tokens"), ref.get("targets"), &loss);
    EXPECT_TRUE(t::tensors_close(c + " merged logits", logits, ref.get("logits"), kTol));
    EXPECT_NEAR(loss, ref.get("loss").data<float>()[0], 1e-4 * std::abs(loss));
    // The adapter matters: without it the logits are elsewhere.
    t::Diff d;
    EXPECT_FALSE(t::tensors_close(c + " base logits", before, ref.get("logits"), kTol, &d));
  }

  const std::string root = t::temp_dir("hf-peft-import");
  const std::string base = hf_dir("llama3"), adapter = hf_dir("llama3_peftin") + "/adapter";
  auto r =
      t::run_lmforge("convert --from-hf '" + base + "' --peft '" + adapter + "' --out run", root);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("with the LoRA adapter"), std::string::npos) << r.out;
  Transformer model(read_hf_config(base).model);
  load_hf_weights(model, base);
  merge_peft_adapter(model, adapter);
  Safetensors saved = Safetensors::open(root + "/run/checkpoints/step-00000000/model.safetensors");
  for (const Param& p : model.params().params()) {
    const Tensor v = saved.get(p.name);
    EXPECT_EQ(std::memcmp(v.raw(), p.value.raw(), p.value.nbytes()), 0) << p.name;
  }
  r = t::run_lmforge("generate --checkpoint run --prompt 'In the' --max-tokens 4 --seed 1", root);
  ASSERT_EQ(r.exit_code, 0) << r.err;

  // Adapters it cannot merge exactly, or that do not fit the base: one error naming file and key.
  auto bad = [&](const std::string& name, const std::function<void(json&)>& edit,
                 const std::string& base_dir, const std::string& want) {
    const std::string d = root + "/" + name;
    fs::create_directories(d);
    fs::copy_file(adapter + "/adapter_model.safetensors", d + "/adapter_model.safetensors");
    json cfg = json::parse(t::slurp(adapter + "/adapter_config.json"));
    edit(cfg);
    std::ofstream(d + "/adapter_config.json") << cfg.dump();
    auto res = t::run_lmforge(
        "convert --from-hf '" + base_dir + "' --peft '" + d + "' --out " + name + "_run", root);
    EXPECT_EQ(res.exit_code, 1) << name;
    EXPECT_NE(res.err.find(want), std::string::npos) << name << ": " << res.err;
    EXPECT_FALSE(fs::exists(root + "/" + name + "_run/checkpoints")) << name;
  };
  bad(
      "dora", [](json& j) { j["use_dora"] = true; }, base, "\"use_dora\": true is not supported");
  bad(
      "ia3", [](json& j) { j["peft_type"] = "IA3"; }, base, "\"peft_type\": \"IA3\"");
  bad(
      "rank", [](json& j) { j["r"] = 8; }, base, "(r = 8) for this base model");
  bad(
      "extra", [](json& j) { j["modules_to_save"] = {"lm_head"}; }, base, "modules_to_save");
  bad(
      "other_base", [](json&) {}, hf_dir("gpt2"), "is no linear layer of this gpt2 model");
  bad(
      "pissa", [](json& j) { j["init_lora_weights"] = "pissa"; }, base, "init_lora_weights");
  bad(
      "replicated",
      [](json& j) {
        j["layer_replication"] = {{0, 2}};
      },
      base, "layer_replication");
  bad(
      "typed", [](json& j) { j["use_rslora"] = "yes"; }, base,
      "\"use_rslora\" must be true or false");
}

// `convert --peft --keep-adapter` keeps a PEFT adapter made by hf_models_ref.py (not by lmforge)
// as the checkpoint's LoRA adapters, each module its own A and B: exported merged they give
// transformers' logits with the adapter merged, and --to-peft writes the same tensors back. Llama
// 3's adapter leaves k_proj out (q_proj, v_proj, down_proj; rsLoRA): model.lora_targets names the
// modules, and lmforge's qkv holds k's A = B = 0, which training must leave at 0 (no gradient
// reaches it) while the others move.
TEST(HfPeftImport, KeptAdaptersMatchTransformersTrainAndExportAgain) {
  const std::string root = t::temp_dir("hf-peft-keep");
  std::ofstream(root + "/text.txt") << "In the beginning God created the heaven and the earth.\n";
  for (const std::string c : {"llama3_peftin", "gpt2_peftin"}) {
    SCOPED_TRACE(c);
    const bool llama = c.starts_with("llama");
    const std::string base = hf_dir(c.substr(0, c.find('_'))), adapter = hf_dir(c) + "/adapter";
    auto r = t::run_lmforge(
        "convert --from-hf '" + base + "' --peft '" + adapter + "' --keep-adapter --out " + c,
        root);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    // rsLoRA's alpha / sqrt(r) = 8 / 2 as lmforge's alpha / r; GPT-2's 6 / 2.
    EXPECT_NE(r.out.find(llama ? "(rank 4, alpha 16, on q_proj,v_proj,down)"
                               : "(rank 2, alpha 6, on qkv,down)"),
              std::string::npos)
        << r.out;
    r = t::run_lmforge("info " + c, root);  // the kept adapters described
    EXPECT_NE(r.out.find(llama ? "lora:         rank 4, alpha 16, on q_proj,v_proj,down:"
                               : "lora:         rank 2, alpha 6, on qkv,down:"),
              std::string::npos)
        << r.out;
    r = t::run_lmforge("export --checkpoint " + c + " --to-hf merged", root);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    Transformer merged(read_hf_config(root + "/merged").model);
    load_hf_weights(merged, root + "/merged");
    Safetensors ref = Safetensors::open(hf_dir(c) + "/ref.safetensors");
    float loss = 0;
    const Tensor logits = run_logits(merged, ref.get("tokens"), ref.get("targets"), &loss);
    EXPECT_TRUE(t::tensors_close(c + " kept adapter's logits", logits, ref.get("logits"), kTol));
    fs::remove_all(root + "/merged");

    // --to-peft gives back the adapter's tensors (k_proj, A = B = 0, left out again).
    r = t::run_lmforge("export --checkpoint " + c + " --to-peft again", root);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    Safetensors in = Safetensors::open(adapter + "/adapter_model.safetensors");
    Safetensors out = Safetensors::open(root + "/again/adapter_model.safetensors");
    EXPECT_EQ(in.names().size(), out.names().size());
    for (const std::string& name : in.names()) {
      ASSERT_TRUE(out.has(name)) << name;
      const Tensor a = in.load(name, DType::kF32), b = out.load(name, DType::kF32);
      ASSERT_TRUE(a.shape() == b.shape()) << name;
      EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0) << name;
    }
    // The adapters' base is the HF directory (not "DIR + peft:ADAPTER"): PEFT loads it.
    auto base_of = [&](const std::string& dir) {
      return json::parse(t::slurp(root + "/" + dir + "/adapter_config.json"))
          .at("base_model_name_or_path");
    };
    EXPECT_EQ(base_of("again"), base);
    fs::remove_all(root + "/again");

    // Two steps of training on top of it: the adapted modules' adapters move, k's stay 0.
    r = t::run_lmforge("train --set init_from=" + c +
                           " --set data.text=text.txt --set data.val_fraction=0 "
                           "--set train.steps=2 --set train.batch_size=1 --set train.seq_len=8 "
                           "--set train.lr=0.01 --set train.eval_every=0 --set run.dir=" +
                           c + "_ft",
                       root);
    ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
    const std::string before = root + "/" + c + "/checkpoints/step-00000000/model.safetensors";
    const std::string after = root + "/" + c + "_ft/checkpoints/step-00000002/model.safetensors";
    Safetensors b0 = Safetensors::open(before), b2 = Safetensors::open(after);
    const ModelConfig mc = read_hf_config(base).model;
    const int64_t r4 = llama ? 4 : 2, C = mc.n_embd, q = mc.n_head * mc.head_size();
    for (const char* layer :
         {"blocks.0.attn.qkv.lora_a", "blocks.0.attn.qkv.lora_b", "blocks.0.mlp.proj.lora_a"}) {
      const Tensor x0 = b0.load(layer, DType::kF32), x2 = b2.load(layer, DType::kF32);
      EXPECT_NE(std::memcmp(x0.raw(), x2.raw(), x0.nbytes()), 0) << layer << " trains";
    }
    if (llama) {  // k: rows [r, 2r) of qkv's A and B^T's columns [q, q + kv)
      const int64_t kv = mc.kv_heads() * mc.head_size();
      const Tensor a = b2.load("blocks.0.attn.qkv.lora_a", DType::kF32);
      const Tensor bt = b2.load("blocks.0.attn.qkv.lora_b", DType::kF32);
      ASSERT_EQ(a.size(0), 3 * r4);
      for (int64_t i = r4 * C; i < 2 * r4 * C; ++i) ASSERT_EQ(a.data<float>()[i], 0.0f) << i;
      for (int64_t k = 0; k < r4; ++k)
        for (int64_t o = q; o < q + kv; ++o)
          ASSERT_EQ(bt.data<float>()[k * bt.size(1) + o], 0.0f) << k << " " << o;
    }
    // Trained further, the adapters' base is still the HF directory (through the converted
    // checkpoint); a LoRA run from the adapter merged into the weights has no HF base.
    r = t::run_lmforge("export --checkpoint " + c + "_ft --to-peft " + c + "_ft_peft", root);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(base_of(c + "_ft_peft"), base);
    if (!llama) continue;
    r = t::run_lmforge("convert --from-hf '" + base + "' --peft '" + adapter + "' --out merged_in",
                       root);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = t::run_lmforge(
        "train --set init_from=merged_in --set model.lora_rank=2 --set data.text=text.txt "
        "--set data.val_fraction=0 --set train.steps=1 --set train.batch_size=1 "
        "--set train.seq_len=8 --set train.eval_every=0 --set run.dir=merged_lora",
        root);
    ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
    r = t::run_lmforge("export --checkpoint merged_lora --to-peft merged_peft", root);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_TRUE(base_of("merged_peft").is_null()) << base_of("merged_peft");
  }
}

// DIR/model.safetensors again without tensor `drop` and with `add` after the rest.
void rewrite_weights(const std::string& dir, const std::string& drop,
                     const std::vector<std::pair<std::string, Tensor>>& add = {}) {
  {
    Safetensors f = Safetensors::open(dir + "/model.safetensors");
    SafetensorsWriter w;
    for (auto& n : f.names())
      if (n != drop) w.add(n, f.get(n).clone());
    for (const auto& [n, t] : add) w.add(n, t);
    w.write(dir + "/rewritten.safetensors");
  }
  fs::rename(dir + "/rewritten.safetensors", dir + "/model.safetensors");
}

// load_hf_weights' error, or "(loaded)" when there is none.
std::string load_error(Transformer& model, const std::string& dir) {
  try {
    load_hf_weights(model, dir);
  } catch (const Error& e) {
    return e.what();
  }
  return "(loaded)";
}

// Bad HF directories: one clear error naming the file and the tensor or field.
TEST(HfBadInput, MissingTensorWrongShapeAndUnsupportedFields) {
  const std::string root = t::temp_dir("hf-bad");
  fs::copy(hf_dir("qwen2"), root + "/m");
  std::string dir = root + "/m";
  // A missing tensor.
  rewrite_weights(dir, "model.layers.1.self_attn.k_proj.bias");
  ModelConfig mc = read_hf_config(dir).model;
  Transformer model(mc);
  const std::string missing = load_error(model, dir);
  EXPECT_NE(missing.find("model.layers.1.self_attn.k_proj.bias"), std::string::npos) << missing;
  EXPECT_NE(missing.find("missing"), std::string::npos) << missing;
  // A tied model whose file stores the head anyway: loaded when it equals the embedding, refused
  // naming both when it differs.
  for (bool differs : {false, true}) {
    const std::string tied = root + (differs ? "/tied-differs" : "/tied-equal");
    fs::copy(hf_dir("smollm"), tied);
    Tensor head =
        Safetensors::open(tied + "/model.safetensors").get("model.embed_tokens.weight").clone();
    if (differs) head.data<float>()[5] += 1.0f;
    rewrite_weights(tied, "", {{"lm_head.weight", head}});
    Transformer m(read_hf_config(tied).model);
    if (!differs) {
      load_hf_weights(m, tied);
      Transformer plain(read_hf_config(hf_dir("smollm")).model);
      load_hf_weights(plain, hf_dir("smollm"));
      const Tensor got = m.params().params().front().value,
                   want = plain.params().params().front().value;
      EXPECT_EQ(std::memcmp(got.raw(), want.raw(), got.nbytes()), 0);
      continue;
    }
    const std::string differing = load_error(m, tied);
    EXPECT_NE(differing.find("lm_head.weight differs"), std::string::npos) << differing;
  }
  // An unsupported rope type and an unknown field, via the CLI.
  json cfg = json::parse(t::slurp(hf_dir("qwen2") + "/config.json"));
  cfg["rope_parameters"] = {{"rope_type", "yarn"}, {"factor", 4.0}, {"rope_theta", 10000.0}};
  std::ofstream(dir + "/config.json") << cfg.dump();
  auto r = t::run_lmforge("info m", root);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("yarn"), std::string::npos) << r.err;
  cfg = json::parse(t::slurp(hf_dir("qwen2") + "/config.json"));
  cfg["use_mrope_magic"] = true;
  std::ofstream(dir + "/config.json") << cfg.dump();
  r = t::run_lmforge("convert --from-hf m --out run", root);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("use_mrope_magic"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(root + "/run/checkpoints")) << "nothing written on error";
  cfg["model_type"] = "falcon";
  std::ofstream(dir + "/config.json") << cfg.dump();
  r = t::run_lmforge("convert --from-hf m --out run", root);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("falcon"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace lmforge
