// Sequence parallelism (dist.sequence_parallel) over MPI ranks (dist/dp_test.h): each rank of a
// tensor-parallel group holds its own rows outside attention and the MLP; against one process
// and tensor parallelism alone, with LoRA, distillation, packed rows, masked targets, evaluation,
// resume, and the preference objectives.
#include "dist/dp_test.h"

namespace lmforge {
namespace {

using testing::RunResult;

TEST_F(DataParallelTest, SequenceParallelMatchesOneProcess) {
  // A group of 2 shares a batch of 2 rows as under tensor parallelism alone, each rank holding 1
  // outside attention and the MLP (which run on the group's rows, gathered): the same training as
  // one process with the group's batch.
  const std::string sp = "--set dist.tensor_parallel=2 --set dist.sequence_parallel=true ";
  // One process ("ref-sp-NAME", unless `against` names a run already made) and a group of 2
  // ("sp2-NAME") with the same options: the same training.
  auto sp_like_one_process = [&](const std::string& name, const std::string& args,
                                 std::string against = "") {
    if (against.empty()) {
      against = "ref-sp-" + name;
      RunResult one = run(against, 1, args);
      ASSERT_EQ(one.exit_code, 0) << one.err;
    }
    RunResult two = run("sp2-" + name, 2, args + sp);
    ASSERT_EQ(two.exit_code, 0) << two.out << two.err;
    expect_same("sp2-" + name, against);
  };
  RunResult r = run("sp2", 2, sp + "--set train.batch_size=2");
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("groups of 2 tensor-parallel ranks (sequence-parallel); global batch 2"),
            std::string::npos)
      << r.out;
  expect_same("sp2", reference(1));
  // Its collectives per step, exactly as lmforge plan counts them (a rank's 1 row).
  const ModelConfig c = checkpoint_model_config(find_latest_checkpoint(*dir_ + "/sp2"));
  const std::vector<double> mib = losses("sp2", "tp_comm_mib");
  EXPECT_EQ(mib.size(), 6u);
  for (double m : mib)
    EXPECT_DOUBLE_EQ(m * 1048576.0,
                     tensor_parallel_traffic_bytes(
                         c, 1, 32, 2, 1, {.sequence_parallel = true, .vocab_parallel = true}));

  // 2 groups of 2; full activation checkpointing (its forward gathers and sums again) with
  // gradient accumulation.
  RunResult d = run("sp4", 4, sp + "--set train.batch_size=2");
  ASSERT_EQ(d.exit_code, 0) << d.out << d.err;
  expect_same("sp4", reference(2));
  RunResult f = run("sp2-full", 2,
                    sp + "--set train.batch_size=2 --set train.grad_accum=2 --set "
                         "train.activation_checkpointing=full");
  ASSERT_EQ(f.exit_code, 0) << f.out << f.err;
  expect_same("sp2-full", reference(2));
  for (double m : losses("sp2-full", "tp_comm_mib"))
    EXPECT_DOUBLE_EQ(m * 1048576.0, tensor_parallel_traffic_bytes(c, 1, 32, 2, 2,
                                                                  {.full_recompute = true,
                                                                   .sequence_parallel = true,
                                                                   .vocab_parallel = true}));

  // Llama (GQA, RoPE, SwiGLU) in bf16 (its norms' outputs gathered in bf16) against one process
  // in bf16, whose branches are rounded to bf16 where the partial sums stay fp32.
  const std::string llama =
      "--set model.preset=llama3-tiny --set train.lr=1e-3 --set train.precision=bf16 "
      "--set train.batch_size=4 ";
  RunResult one = run("ref-llama-bf16", 1, llama);
  ASSERT_EQ(one.exit_code, 0) << one.err;
  RunResult l = run("sp2-llama-bf16", 2, llama + sp);
  ASSERT_EQ(l.exit_code, 0) << l.out << l.err;
  std::vector<double> a = losses("sp2-llama-bf16"), b = losses("ref-llama-bf16");
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-3 * b[i]) << "step " << i + 1;
  const ModelConfig lc = checkpoint_model_config(find_latest_checkpoint(*dir_ + "/sp2-llama-bf16"));
  for (double m : losses("sp2-llama-bf16", "tp_comm_mib"))
    EXPECT_DOUBLE_EQ(m * 1048576.0,
                     tensor_parallel_traffic_bytes(
                         lc, 2, 32, 2, 1,
                         {.sequence_parallel = true, .bf16_inputs = true, .vocab_parallel = true}));

  // LoRA (the adapters' products x A^T on the group's rows; the replicated factors' partial
  // gradients summed over the group) with Llama's q/k norms, against one process.
  const std::string lora =
      "--set model.preset=llama3-tiny --set model.qk_norm=true --set train.lr=1e-3 --set "
      "train.batch_size=2 --set model.lora_rank=4 ";
  sp_like_one_process("lora", lora);

  // Distillation: the teacher (sp2's model) split and sequence-parallel like the student, each
  // rank's columns of both models' logits of the group's rows.
  const std::string distill =
      "--set train.batch_size=2 --set model.n_layer=2 --set "
      "train.objective=distill --set train.teacher=" +
      *dir_ + "/sp2 ";
  sp_like_one_process("distill", distill);
  {  // the KL term, summed over the group's rows
    const std::vector<double> a = losses("sp2-distill", "kl"), b = losses("ref-sp-distill", "kl");
    ASSERT_EQ(a.size(), b.size());
    // (relative, with an absolute floor: the KL is a mean of differences of fp32 log-probabilities
    // of magnitude ~5, whose rounding in the group's other summation order reached 5.5e-8 on a
    // KL of 2.3e-3 with AVX2's matmuls, Zen 3)
    for (size_t i = 0; i < a.size(); ++i)
      EXPECT_NEAR(a[i], b[i], 1e-5 * b[i] + 2e-7) << "kl " << i + 1;
    // The student's and the teacher's gathers and scatters, as lmforge plan counts them (a rank's
    // 1 row).
    const ModelConfig sc = checkpoint_model_config(find_latest_checkpoint(*dir_ + "/sp2-distill")),
                      tc = checkpoint_model_config(find_latest_checkpoint(*dir_ + "/sp2"));
    for (double mb : losses("sp2-distill", "tp_comm_mib"))
      EXPECT_DOUBLE_EQ(mb * 1048576.0,
                       tensor_parallel_traffic_bytes(
                           sc, 1, 32, 2, 1,
                           {.sequence_parallel = true, .vocab_parallel = true, .teacher = &tc}));
  }

  // Packed rows (best-fit: several short documents a row, each attending to itself with its own
  // positions): the group's position ids and document starts gathered for attention and RoPE,
  // each rank's own for the learned positions; GPT-2 and Llama against one process.
  {
    std::ofstream f(*dir_ + "/docs.txt");
    std::mt19937 rng(7);
    const char* words[] = {"and", "the", "light", "was", "good", "in", "beginning", "God"};
    for (int d = 0; d < 300; ++d) {
      const int n = 2 + static_cast<int>(rng() % 7);
      for (int w = 0; w < n; ++w) f << (w ? " " : "") << words[rng() % 8];
      f << "\n\n";
    }
  }
  RunResult pr = testing::run_lmforge(
      "prepare --input docs.txt --output docs --text-mode blank_line --val-fraction 0", *dir_);
  ASSERT_EQ(pr.exit_code, 0) << pr.err;
  const std::string packed =
      "--set data.text= --set data.tokenizer=byte --set model.vocab_size=0 --set "
      "data.train=docs/data --set data.packing=best_fit --set train.batch_size=2 ";
  // sp_like_one_process, and the traffic as counted, the positions' gathers included.
  auto packed_run = [&](const std::string& name, const std::string& args,
                        const std::string& against = "") {
    sp_like_one_process(name, args, against);
    const ModelConfig pc = checkpoint_model_config(find_latest_checkpoint(*dir_ + "/sp2-" + name));
    for (double mb : losses("sp2-" + name, "tp_comm_mib"))
      EXPECT_DOUBLE_EQ(mb * 1048576.0,
                       tensor_parallel_traffic_bytes(pc, 1, 32, 2, 1,
                                                     {.sequence_parallel = true,
                                                      .vocab_parallel = pc.vocab_size % 2 == 0,
                                                      .packed_rows = true}))
          << name;
  };
  packed_run("packed-gpt2", packed);
  // (an odd vocabulary: not split, each rank embedding its own rows with its own position ids)
  packed_run("packed-gpt2-odd", packed + "--set model.vocab_size=257 ");
  // Llama (RoPE at the packed positions): sequence parallelism against tensor parallelism alone
  // (the same sums, gathered instead: equal to rounding), and that against one process. Tensor
  // parallelism's partial sums round differently from one process, and on these packed rows
  // AdamW magnifies it to ~1.5e-5 of the loss by step 3 (the same for both; over 40 steps of
  // batch 4 they stay within 2e-5 of one process's losses, down to 0.93, where a wrong position
  // or document start would show), so that comparison gets 1e-4.
  const std::string packed_llama = packed + "--set model.preset=llama3-tiny ";
  RunResult l1 = run("ref-packed-llama", 1, packed_llama);
  ASSERT_EQ(l1.exit_code, 0) << l1.err;
  EXPECT_NE(l1.out.find("cut by packing"), std::string::npos) << l1.out;  // (packed, really)
  RunResult lt = run("tp2-packed-llama", 2, packed_llama + "--set dist.tensor_parallel=2");
  ASSERT_EQ(lt.exit_code, 0) << lt.out << lt.err;
  packed_run("packed-llama", packed_llama, "tp2-packed-llama");
  {
    const std::vector<double> a = losses("tp2-packed-llama"), b = losses("ref-packed-llama");
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i)
      EXPECT_NEAR(a[i], b[i], 1e-4 * b[i]) << "tp2 packed llama, step " << i + 1;
  }

  // Validation: each rank scores its 1/N of every batch, the loss summed over the group: one
  // process's over the same rows.
  const std::string eval =
      "--set train.batch_size=2 --set train.eval_every=3 --set "
      "train.eval_batches=5 --set train.steps=3 ";
  RunResult ve = run("sp2-eval", 2, sp + eval);
  ASSERT_EQ(ve.exit_code, 0) << ve.out << ve.err;
  RunResult vo = run("ref-eval", 1, eval);
  ASSERT_EQ(vo.exit_code, 0) << vo.err;
  const std::vector<double> va = losses("sp2-eval", "val_loss"),
                            vb = losses("ref-eval", "val_loss");
  ASSERT_EQ(va.size(), 1u);
  ASSERT_EQ(vb.size(), 1u);
  EXPECT_NEAR(va[0], vb[0], 1e-6 * vb[0]);

  // Masked targets (SFT): rows whose tokens are all prompt have none, so a rank's loss scale
  // can be 0 for its own rows while its columns of the vocabulary still score the others'.
  {
    std::ofstream f(*dir_ + "/chat.jsonl");
    for (int i = 0; i < 24; ++i) {
      std::string user = "Verse " + std::to_string(i);
      for (int w = 0; w < (i % 2 ? 40 : 2); ++w) user += " and the earth was";
      f << nlohmann::json({{"messages",
                            {{{"role", "user"}, {"content", user}},
                             {{"role", "assistant"}, {"content", "Amen, so be it."}}}}})
               .dump()
        << "\n";
    }
  }
  const std::string llama3 = testing::shared_tokenizers_dir() + "/llama3.tiktoken";
  RunResult pc =
      testing::run_lmforge("prepare --input chat.jsonl --output chat --tokenizer " + llama3 +
                               " --format chat --chat-template llama3 "
                               "--val-docs 0",
                           *dir_);
  ASSERT_EQ(pc.exit_code, 0) << pc.err;
  const std::string chat =
      "--set data.text= --set data.tokenizer=" + llama3 +
      " --set model.vocab_size=0 --set data.train=chat/data --set train.batch_size=2 ";
  RunResult mo = run("ref-masked", 1, chat);
  ASSERT_EQ(mo.exit_code, 0) << mo.out << mo.err;
  RunResult ms = run("sp2-masked", 2, chat + sp);
  ASSERT_EQ(ms.exit_code, 0) << ms.out << ms.err;
  expect_same("sp2-masked", "ref-masked");

  // A resume is bit-exact.
  RunResult k = run("sp-ckpt", 2,
                    sp + "--set train.batch_size=2 --set train.checkpoint_every=3 --set "
                         "train.keep_last=0");
  ASSERT_EQ(k.exit_code, 0) << k.out << k.err;
  RunResult again =
      run("sp-resume", 2,
          sp + "--set train.batch_size=2 --resume=" + *dir_ + "/sp-ckpt/checkpoints/step-00000003");
  ASSERT_EQ(again.exit_code, 0) << again.out << again.err;
  expect_resumed("sp-resume", "sp-ckpt");
}

// The preference objectives under sequence parallelism: each rank scores its own pairs (KTO: its
// labelled rows) with the policy and the reference, its group's KL rows made from the group's
// gathered tokens, the terms summed over the group; each rank's columns of the vocabulary weigh
// the group's rows by their ranks' weights. The same training as tensor parallelism alone, and
// as one process with the group's batch (to the tolerance TP's partial sums need under DPO's
// sigmoid: DpoOnEveryStrategyMatchesOneProcess).
TEST_F(DataParallelTest, SequenceParallelPreferenceObjectivesMatchTensorParallelAlone) {
  // (KTO's prompts repeat: its KL rows pair each reply with another prompt's)
  prepare_preferences("sp-prefs", /*labelled=*/false, 40, 0.2);
  prepare_preferences("sp-labelled", /*labelled=*/true, 7, 0.2);
  const std::string byte =
      "--set data.text= --set data.tokenizer=byte --set model.vocab_size=0 --set "
      "train.batch_size=4 ";
  const std::string tp = "--set dist.tensor_parallel=2 ";
  const std::string sp = tp + "--set dist.sequence_parallel=true ";
  struct Case {
    std::string name, args;
    int64_t extra_forwards;
    bool kl_rows;
  };
  const std::string prefs = byte + "--set data.train=sp-prefs/data ";
  for (const Case& c : {
           Case{"dpo", prefs + "--set train.objective=dpo --set train.dpo_beta=0.5 ", 1, false},
           Case{"orpo", prefs + "--set train.objective=orpo ", 0, false},
           Case{"simpo", prefs + "--set train.objective=simpo --set train.cpo_alpha=0.5 ", 0,
                false},
           Case{"kto", byte + "--set data.train=sp-labelled/data --set train.objective=kto ", 3,
                true},
       }) {
    RunResult one = run("pref-one-" + c.name, 1, c.args);
    ASSERT_EQ(one.exit_code, 0) << c.name << "\n" << one.out << one.err;
    RunResult alone = run("pref-tp2-" + c.name, 2, c.args + tp);
    ASSERT_EQ(alone.exit_code, 0) << c.name << "\n" << alone.out << alone.err;
    RunResult two = run("pref-sp2-" + c.name, 2, c.args + sp);
    ASSERT_EQ(two.exit_code, 0) << c.name << "\n" << two.out << two.err;
    // (DPO saturates: kSaturatedDpo)
    const double tol = c.name == "dpo" ? kSaturatedDpo : 1e-5;
    expect_same("pref-sp2-" + c.name, "pref-tp2-" + c.name, tol, tol);
    // (ORPO's gradient, through 1 / (1 - e^a) of a response near probability 1, jumps to a norm
    // of ~34 at step 6, where TP's partial sums, alone as with sequence parallelism, are 1.2e-3 of
    // it from one process's)
    expect_same("pref-sp2-" + c.name, "pref-one-" + c.name, 1e-4, c.name == "orpo" ? 3e-3 : 1e-4);
    // The objective's metrics (rewards, margins; KTO's KL estimate) over the group's rows.
    for (const char* key : {"reward_margin", "reward_chosen"}) {
      const std::vector<double> a = losses("pref-sp2-" + c.name, key),
                                b = losses("pref-one-" + c.name, key);
      ASSERT_EQ(a.size(), b.size()) << c.name << " " << key;
      for (size_t i = 0; i < a.size(); ++i)
        EXPECT_NEAR(a[i], b[i], 1e-4 * std::abs(b[i]) + 1e-7) << c.name << " " << key << " " << i;
    }
    // The partial sums, gathers and scatters as lmforge plan counts them (a rank's 2 rows).
    const ModelConfig mc =
        checkpoint_model_config(find_latest_checkpoint(*dir_ + "/pref-sp2-" + c.name));
    const double planned = tensor_parallel_traffic_bytes(mc, 2, 32, 2, 1,
                                                         {.sequence_parallel = true,
                                                          .extra_forwards = c.extra_forwards,
                                                          .kl_rows = c.kl_rows,
                                                          .vocab_parallel = true,
                                                          .rows_weighed = true});
    const std::vector<double> mib = losses("pref-sp2-" + c.name, "tp_comm_mib");
    ASSERT_EQ(mib.size(), 6u) << c.name;
    for (double m : mib) EXPECT_DOUBLE_EQ(m * 1048576.0, planned) << c.name;
  }
  const std::string dpo = prefs + "--set train.objective=dpo --set train.dpo_beta=0.5 ";
  // The reference's log-likelihoods precomputed, 2 groups of 2 (full-shard across them): each
  // group scores every other group batch, each rank its own rows of it; the same values as the
  // reference's forwards in the steps give. (Against one process: this run's DPO saturates, its
  // loss ~6e-5 by step 4, where TP's roundings show at ~1e-4 of it, and ~3e-4 of its gradient
  // norm with AVX2's matmuls.)
  const std::string sp4 = dpo + sp + "--set dist.strategy=full-shard ";
  RunResult in_step = run("pref-sp4", 4, sp4);
  ASSERT_EQ(in_step.exit_code, 0) << in_step.out << in_step.err;
  RunResult pre = run("pref-sp4-pre", 4, sp4 + "--set train.precompute_ref_logps=true");
  ASSERT_EQ(pre.exit_code, 0) << pre.out << pre.err;
  expect_same("pref-sp4-pre", "pref-sp4", kSaturatedDpo, kSaturatedDpo);
  RunResult one4 = run("pref-one-dpo-accum", 1, dpo + "--set train.grad_accum=2");
  ASSERT_EQ(one4.exit_code, 0) << one4.out << one4.err;
  expect_same("pref-sp4", "pref-one-dpo-accum", 1e-3, 1e-3);
  // LoRA: the reference is the policy with its adapters off (the same group's forward).
  const std::string lora = dpo + "--set model.lora_rank=4 --set train.lr=1e-2 ";
  RunResult lo = run("pref-one-lora", 1, lora);
  ASSERT_EQ(lo.exit_code, 0) << lo.out << lo.err;
  RunResult ls = run("pref-sp2-lora", 2, lora + sp);
  ASSERT_EQ(ls.exit_code, 0) << ls.out << ls.err;
  expect_same("pref-sp2-lora", "pref-one-lora", 1e-4, 1e-4);
  // Validation: each rank scores its rows of every group batch, the sums over the group.
  for (const Case& c : {Case{"dpo", dpo + "--set data.val=sp-prefs/data ", 0, false},
                        Case{"kto",
                             byte + "--set data.train=sp-labelled/data --set "
                                    "data.val=sp-labelled/data --set train.objective=kto ",
                             0, false}}) {
    const std::string args = c.args + "--set train.eval_every=3 --set train.eval_batches=3 ";
    RunResult a = run("pref-eval-one-" + c.name, 1, args);
    ASSERT_EQ(a.exit_code, 0) << a.out << a.err;
    RunResult b = run("pref-eval-sp2-" + c.name, 2, args + sp);
    ASSERT_EQ(b.exit_code, 0) << b.out << b.err;
    for (const char* key : {"val_loss", "val_reward_margin"}) {
      const std::vector<double> va = losses("pref-eval-sp2-" + c.name, key),
                                vb = losses("pref-eval-one-" + c.name, key);
      ASSERT_EQ(va.size(), 2u) << c.name << " " << key;
      ASSERT_EQ(vb.size(), 2u) << c.name << " " << key;
      for (size_t i = 0; i < 2; ++i)
        EXPECT_NEAR(va[i], vb[i], 1e-4 * std::abs(vb[i]) + 1e-7) << c.name << " " << key;
    }
  }
  // A pair's two rows stay on one rank.
  RunResult odd = run("pref-odd", 2, dpo + sp + "--set train.batch_size=2");
  EXPECT_NE(odd.exit_code, 0);
  EXPECT_NE(odd.err.find("a preference pair takes two rows of one rank; choose a multiple of 4"),
            std::string::npos)
      << odd.err;
}

}  // namespace
}  // namespace lmforge
