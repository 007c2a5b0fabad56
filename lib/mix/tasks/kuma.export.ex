defmodule Mix.Tasks.Kuma.Export do
  @shortdoc "Exports one entity (GDPR Art. 15/20): its events, snapshots and chain"
  @moduledoc """
  Exports everything a store holds of one entity (`Kuma.export/2`) to standard output:
  as an Elixir term, or with `--json` as the JSON document `Kuma.export_json/2` gives.

      mix kuma.export ID [--json] [--data-dir DIR] [--master-key-file FILE]

  Exit codes: 0 printed; 2 bad arguments, no such store, or the entity cannot be
  exported (erased, for instance). See `mix help kuma`.
  """
  use Mix.Task

  @impl true
  def run(args) do
    Mix.Tasks.Kuma.with_store(__MODULE__, args, [json: :boolean], fn store, opts, rest ->
      id = Mix.Tasks.Kuma.single_id(rest)

      result = if opts[:json], do: Kuma.export_json(store, id), else: Kuma.export(store, id)

      case result do
        {:ok, json} when is_binary(json) -> IO.puts(json)
        {:ok, export} -> IO.puts(inspect(export, pretty: true, limit: :infinity, printable_limit: :infinity))
        {:error, reason} -> Mix.Tasks.Kuma.fail("cannot export #{inspect(id)}: #{Kuma.format_error(reason)}")
      end
    end)
  end
end
