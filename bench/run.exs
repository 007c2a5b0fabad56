# Kuma's benchmark suite: `mix bench` (everything), `mix bench --quick`, `mix bench W1`.
#
# Every workload prints progress while it runs, then one table with Kuma's figures beside
# the raw SQLite ceiling measured in the same session, and writes bench/results/<date>.json
# with the machine's facts. Methodology: docs/benchmarks.md.

Code.require_file("support.exs", __DIR__)
for file <- Path.wildcard(Path.join(__DIR__, "workloads/*.exs")), do: Code.require_file(file)

defmodule Kuma.Bench do
  @moduledoc false
  alias Kuma.Bench.Machine

  # name => {module, what it measures}; `mix bench` runs them in this order.
  @workloads [
    {"W1", Kuma.Bench.W1, "seed workload: 1M events, 200 writers, appends of 100"},
    {"W2", Kuma.Bench.W2, "single-event writes through entity processes"},
    {"W4", Kuma.Bench.W4, "reads of live entities"},
    {"W5", Kuma.Bench.W5, "cold loads of entities with 1,000 events"},
    {"MEM", Kuma.Bench.Memory, "memory per idle live entity"},
    {"ERASE", Kuma.Bench.Erase, "delete of an entity with 10,000 events, and its effect on the shard"},
    {"NIF", Kuma.Bench.NifCost, "scheduler time of an append NIF call"}
  ]

  def main(args) do
    {opts, names, _} = OptionParser.parse(args, strict: [quick: :boolean])
    quick = Keyword.get(opts, :quick, false)
    known = Enum.map(@workloads, &elem(&1, 0))
    names = if names == [], do: known, else: Enum.map(names, &String.upcase/1)

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

    write_results(facts, quick, results)
  end

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
