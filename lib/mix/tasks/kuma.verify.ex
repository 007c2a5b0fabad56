defmodule Mix.Tasks.Kuma.Verify do
  @shortdoc "Verifies every hash chain of a store, shard by shard"
  @moduledoc """
  Verifies every entity's hash chain in every shard (`Kuma.verify_store/2`), printing
  progress per shard.

      mix kuma.verify [--data-dir DIR] [--master-key-file FILE]

  Exit codes: 0 every chain is intact; 1 tampering or damage was found (each broken
  entity is listed with its shard and first bad seq); 2 bad arguments, or the store could
  not be opened. See `mix help kuma`.
  """
  use Mix.Task

  @impl true
  def run(args) do
    Mix.Tasks.Kuma.with_store(__MODULE__, args, [], fn store, _opts, _rest ->
      progress = fn shard, shards, report ->
        Mix.shell().info("shard #{shard + 1}/#{shards}: #{report.entities} entities, #{report.events} events checked")
      end

      case Kuma.verify_store(store, on_progress: progress) do
        {:ok, %{shards: s, entities: e, events: v}} ->
          Mix.shell().info("ok: #{s} shards, #{e} entities, #{v} events, every chain intact")

        {:error, {:tampered, problems}} ->
          Mix.Tasks.Kuma.print_problems(problems)
          Mix.Tasks.Kuma.fail("#{length(problems)} broken chain(s)", 1)

        {:error, reason} ->
          Mix.Tasks.Kuma.fail("verify failed: #{Kuma.format_error(reason)}")
      end
    end)
  end
end
