# Kuma's benchmark suite: `mix bench` (everything), `mix bench --quick`, `mix bench W1`.
#
# Every workload prints progress while it runs, then one table with Kuma's figures beside
# the raw SQLite ceiling measured in the same session, and writes bench/results/<date>.json
# with the machine's facts. Methodology: docs/benchmarks.md.

Code.require_file("support.exs", __DIR__)
# W1 and W2 first: other workloads (W8, PROJ) drive their loads.
for file <- ["workloads/w1.exs", "workloads/w2.exs"], do: Code.require_file(file, __DIR__)
for file <- Path.wildcard(Path.join(__DIR__, "workloads/*.exs")), do: Code.require_file(file)

defmodule Kuma.Bench do
  @moduledoc false
  alias Kuma.Bench.Machine

  # name => {module, what it measures}; `mix bench` runs them in this order.
  @workloads [
    {"W1", Kuma.Bench.W1, "seed workload: 1M events, 200 writers, appends of 100"},
    {"W2", Kuma.Bench.W2, "single-event writes through entity processes"},
    {"W3", Kuma.Bench.W3, "bulk ingest: append_batch, 500 events per call"},
    {"W4", Kuma.Bench.W4, "reads of live entities"},
    {"W5", Kuma.Bench.W5, "cold loads of entities with 1,000 events"},
    {"W6", Kuma.Bench.Erase, "GDPR delete of entities with 10,000 events while writes run"},
    {"W7", Kuma.Bench.W7, "restart: Kuma.start to first served read with many events stored"},
    {"W8", Kuma.Bench.W8, "scaling: W1 by shard count, W2 by concurrent callers"},
    {"PROJ", Kuma.Bench.Proj, "projections under W1 load, subscriber, catch-up replay"},
    {"SUBS", Kuma.Bench.Subs, "single-event appends with 0, 100 and 1,000 idle per-entity subscriptions"},
    {"MEM", Kuma.Bench.Memory, "memory per idle live entity"},
    {"OPS", Kuma.Bench.Ops, "W1 with /metrics scraped and telemetry attached vs none; backup MB/s under W1"},
    {"PG", Kuma.Bench.Postgres, "W1 and W2 shapes against PostgreSQL, same machine, same run"},
    {"REDIS", Kuma.Bench.Redis, "W1 and W2 shapes against Redis streams (AOF), same machine, same run"},
    {"NIF", Kuma.Bench.NifCost, "scheduler time of an append NIF call"},
    {"CLUSTER", Kuma.Bench.ClusterBench, "cluster mode on 3 local nodes beside single node: W1, W2, failover"}
  ]

  # `--quick`: a subset that finishes in about two minutes on the 2-core machine.
  @quick ["W1", "W2", "W4", "W5", "W6"]

  def main(args) do
    {opts, names, _} = OptionParser.parse(args, strict: [quick: :boolean])
    quick = Keyword.get(opts, :quick, false)
    known = Enum.map(@workloads, &elem(&1, 0))

    names =
      cond do
        names != [] -> Enum.map(names, &String.upcase/1)
        quick -> @quick
        true -> known
      end

    for name <- names, name not in known do
      Mix.raise("unknown workload #{name}; known: #{Enum.join(known, ", ")}")
    end

    facts = Machine.facts()

    IO.puts(
      "Kuma benchmarks#{if quick, do: " (quick)", else: ""} on #{facts.cores} cores, #{facts.memory_gib} GiB, #{facts.cpu}"
    )

    IO.puts("OTP #{facts.otp}, Elixir #{facts.elixir}, #{facts.rust}, SQLite #{facts.sqlite}\n")

    results =
      for {name, module, what} <- @workloads, name in names, into: %{} do
        IO.puts("== #{name}: #{what}")
        {name, module.run(quick)}
      end

    side_by_side(results)
    write_results(facts, quick, results)
  end

  # Kuma beside the peers that ran in this session: PostgreSQL (synchronous_commit off/on)
  # and Redis (appendfsync everysec/always) beside Kuma's sync normal/full.
  defp side_by_side(results) do
    peers =
      [
        {"PG", "PostgreSQL", :synchronous_commit, [normal: "off", full: "on"]},
        {"REDIS", "Redis", :appendfsync, [normal: "everysec", full: "always"]}
      ]
      |> Enum.filter(fn {name, _, _, _} -> match?(%{rows: _}, results[name]) end)

    if peers != [] and (results["W1"] || results["W2"]) do
      IO.puts("Side by side (same machine, same run; ratio = Kuma / peer)")

      for sync <- [:normal, :full] do
        w1 = get_in(results, ["W1", :rows]) |> List.wrap() |> Enum.find(&(&1.sync == sync))

        w2 =
          get_in(results, ["W2", :rows])
          |> List.wrap()
          |> Enum.find(&(&1.sync == sync and &1.op == :execute and &1[:entities] in [nil, 200]))

        kuma_w1 = w1 && w1.kuma.events_per_sec
        kuma_w2 = w2 && w2.events_per_sec

        for {name, label, key, modes} <- peers do
          mode = modes[sync]
          row = Enum.find(results[name].rows, &(to_string(Map.get(&1, key)) == mode))

          if row do
            IO.puts(
              "  Kuma sync=#{sync} vs #{label} #{mode}: W1 #{pair(kuma_w1, row.w1_events_per_sec)}; " <>
                "W2 #{pair(kuma_w2, row.w2_events_per_sec)}"
            )
          end
        end
      end

      IO.puts("")
    end
  end

  defp pair(nil, peer), do: "(Kuma not run) vs #{Kuma.Bench.Progress.fmt(peer)} ev/s"

  defp pair(kuma, peer),
    do:
      "#{Kuma.Bench.Progress.fmt(kuma)} vs #{Kuma.Bench.Progress.fmt(peer)} ev/s (#{Float.round(kuma / max(peer, 1), 2)}x)"

  defp write_results(facts, quick, results) do
    dir = Path.expand("results", __DIR__)
    File.mkdir_p!(dir)
    stamp = DateTime.utc_now() |> DateTime.truncate(:second) |> DateTime.to_iso8601() |> String.replace(":", "")
    path = Path.join(dir, "#{stamp}#{if quick, do: "-quick", else: ""}.json")
    File.write!(path, Kuma.JSON.encode!(%{machine: facts, quick: quick, results: results}) <> "\n")
    IO.puts("results written to #{Path.relative_to_cwd(path)}")
  end
end

Kuma.Bench.main(System.argv())
