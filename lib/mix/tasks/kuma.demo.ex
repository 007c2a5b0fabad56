defmodule Mix.Tasks.Kuma.Demo do
  @shortdoc "Runs Kuma's demo on ./data and prints what it did"
  @moduledoc """
  Starts a store in `./data` (or `--data-dir DIR`), writes a few bank accounts as event
  streams, reads them back, verifies their hash chains and prints each step. Run it twice:
  the second run finds the first run's events and continues their streams.

      mix kuma.demo
      mix kuma.demo --data-dir /tmp/kuma-demo --shards 4
  """
  use Mix.Task

  @impl true
  def run(args) do
    {opts, _, _} = OptionParser.parse(args, strict: [data_dir: :string, shards: :integer])
    data_dir = Path.expand(Keyword.get(opts, :data_dir, "data"))
    shards = Keyword.get(opts, :shards, 16)
    Mix.Task.run("app.start")
    Kuma.Demo.run(data_dir, shards)
  end
end

defmodule Kuma.Demo do
  @moduledoc false
  # The demo behind `mix kuma.demo` (kept here so it is compiled and type-checked).

  def run(data_dir, shards) do
    say("Kuma demo: data dir #{data_dir}, #{shards} shards")

    {:ok, store} =
      case Kuma.start(name: :kuma_demo, data_dir: data_dir, shards: shards) do
        {:ok, store} -> {:ok, store}
        {:error, reason} -> Mix.raise("cannot start the store: " <> Kuma.format_error(reason))
      end

    accounts = ["alice", "bob", "carol"]

    for id <- accounts do
      {:ok, head} = Kuma.head(store, id)
      before = if head, do: head.seq, else: 0
      events = if before == 0, do: [{:opened, %{owner: id}}], else: []
      events = events ++ [{:credited, %{amount: 100}}, {:debited, %{amount: 30}}]
      {:ok, last} = Kuma.append(store, id, events, expected_seq: before, metadata: %{source: "demo"})
      {:ok, shard} = Kuma.shard_for(store, id)
      say("  appended #{length(events)} events to #{id} (shard #{shard}): seq #{before + 1}..#{last}")
    end

    say("A stale write is refused and changes nothing:")
    {:error, reason} = Kuma.append(store, "alice", {:debited, %{amount: 1}}, expected_seq: 0)
    say("  " <> Kuma.format_error(reason))

    say("Bulk ingest of 10,000 events over 100 sensors in one call:")
    entries = for s <- 1..100, do: {"sensor-#{s}", Enum.map(1..100, &{:reading, %{value: &1}})}
    {micros, {:ok, _}} = :timer.tc(fn -> Kuma.append_batch(store, entries) end)
    say("  committed in #{div(micros, 1000)} ms")

    say("Reading back (balance = credits - debits, folded from the events):")

    for id <- accounts do
      events = Kuma.stream(store, id) |> Enum.to_list()
      balance = Enum.reduce(events, 0, &apply_event/2)
      {:ok, %{events: n, hash: hash}} = Kuma.verify(store, id)

      say(
        "  #{id}: #{n} events, balance #{balance}, chain verified, head #{Base.encode16(hash, case: :lower) |> binary_part(0, 16)}..."
      )
    end

    {:ok, summary} = Kuma.verify_store(store)
    say("Whole store verified: #{summary.events} events of #{summary.entities} entities in #{summary.shards} shards")
    :ok = Kuma.stop(store)
    say("Stopped. Run it again: the streams continue where they ended.")
  end

  defp apply_event(%Kuma.Envelope{data: {:credited, %{amount: a}}}, balance), do: balance + a
  defp apply_event(%Kuma.Envelope{data: {:debited, %{amount: a}}}, balance), do: balance - a
  defp apply_event(_event, balance), do: balance

  defp say(line), do: IO.puts(line)
end
