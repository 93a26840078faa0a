// `victor repro`: the orchestrator. GridVQA -> the shared start (stages 0, L, C) -> every model of
// the comparison trained with identical budgets and evaluated -> benchmarked -> the report.
#include "victor/repro.h"

#include <chrono>
#include <filesystem>
#include <memory>

#include "repro/internal.h"
#include "victor/distributed.h"

namespace fs = std::filesystem;

namespace victor {

std::string run_repro(const ReproOptions& o) {
  using namespace repro;
  const auto t_all = std::chrono::steady_clock::now();
  // Under `--nproc`, torchrun or Slurm: every training stage is data-parallel over the ranks, each
  // taking its share of the same global batch (so the recipe, and the models it trains, do not
  // change with the rank count). Rank 0 alone builds the data, runs stage 0, saves the shared
  // start, evaluates, benchmarks and writes the report; the others wait for it at barriers and
  // leave after the last training stage.
  std::unique_ptr<Communicator> own_comm;
  Communicator* comm = o.comm;
  if (!comm)
    if (auto env = dist_env_from_environment()) {
      own_comm = std::make_unique<Communicator>(*env, std::chrono::seconds(o.dist_timeout_seconds));
      comm = own_comm.get();
    }
  const Context c{o, comm, comm ? comm->world_size() : 1, !comm || comm->rank() == 0,
                  (fs::path(o.out) / "gridvqa").string(), (fs::path(o.out) / "models" / "init").string()};
  set_quiet(!c.lead);

  check_options(o, c.world);  // before any work is done
  fs::create_directories(o.out);
  const MainData d = build_main_data(c);
  make_initial_model(c);
  const Tokenizer tok(c.init_dir);
  Results r;
  if (o.vision_steps > 0) r.vision = stage0_vision(c, d.options);
  if (o.text_steps > 0) r.text = stage_l_text(c, tok);
  r.curriculum = stage_c_curriculum(c, tok);
  r.runs = plan_runs(o);
  train_and_evaluate(c, tok, d, r.runs);
  time_training(c, tok, d, r.runs);
  if (!c.lead) return "";  // every training stage is done: the rest is rank 0's
  r.prior = answer_prior(d.convs, d.questions);
  r.bench = benchmark(c, r.runs, r);
  r.conversations = d.convs.size();
  r.questions = d.questions.size();
  r.world = c.world;
  r.threads = at::get_num_threads();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_all).count();
  return write_report(o, r);
}

}  // namespace victor
