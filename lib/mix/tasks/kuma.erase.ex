defmodule Mix.Tasks.Kuma.Erase do
  @shortdoc "Erases one entity for good (GDPR Art. 17), after confirmation"
  @moduledoc """
  Erases one entity (`Kuma.delete/3`): its events, snapshots and head, and its data key,
  so no copy of it anywhere (backups included) can be read again. Asks for confirmation
  (type the id again) unless `--yes`.

      mix kuma.erase ID [--yes] [--data-dir DIR] [--master-key-file FILE]

  Exit codes: 0 erased; 1 not confirmed (nothing done); 2 bad arguments, no such store,
  or the erasure failed. See `mix help kuma`.
  """
  use Mix.Task

  @impl true
  def run(args) do
    Mix.Tasks.Kuma.with_store(__MODULE__, args, [yes: :boolean], fn store, opts, rest ->
      id = Mix.Tasks.Kuma.single_id(rest)

      confirmed =
        opts[:yes] ||
          String.trim(Mix.shell().prompt("Erase #{inspect(id)} for good? Type the id again to confirm:") || "") == id

      unless confirmed, do: Mix.Tasks.Kuma.fail("not confirmed: nothing erased", 1)

      case Kuma.delete(store, id) do
        {:ok, %{events_deleted: n}} -> Mix.shell().info("erased #{inspect(id)}: #{n} events")
        {:error, reason} -> Mix.Tasks.Kuma.fail("cannot erase #{inspect(id)}: #{Kuma.format_error(reason)}")
      end
    end)
  end
end
