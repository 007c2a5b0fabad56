defmodule Kuma.Projection.Sink.Handler do
  @moduledoc false
  # The sink of a `Kuma.Projection`: `handle_event/2` folds each event into the
  # projection's state; the checkpoint (and parked events) live in its own file.

  use Kuma.Projection.Sink, :durable

  alias Kuma.Projection.{Progress, Sink}

  defstruct [:db, :module, :args, :user]

  @impl true
  def open(spec, s) do
    with {:ok, db} <- Progress.open(spec.path, identity(spec, s), spec.file_mode),
         {:ok, checkpoint} <- load(db, spec.checkpoint) do
      start(%__MODULE__{db: db, module: spec.module, args: spec.args}, checkpoint)
    end
  end

  defp identity(spec, s), do: %{"store_id" => s.store_id, "kind" => "projection", "module" => inspect(spec.module)}

  # `checkpoint: :memory`: every start replays from the first event.
  defp load(db, :memory), do: with(:ok <- Progress.clear_checkpoint(db), do: {:ok, %{}})
  defp load(db, :durable), do: Progress.checkpoint(db)

  # The user's init/1; a failure stops the projection (status :stopped) instead of
  # crashing it in a restart loop.
  defp start(sink, checkpoint) do
    case Sink.user(fn -> sink.module.init(sink.args) end) do
      {:ok, {:ok, user}} -> {:ok, %{sink | user: user}, checkpoint, nil}
      {:ok, other} -> {:ok, sink, checkpoint, {:bad_return, :init, other}}
      {:error, error} -> {:ok, sink, checkpoint, error}
    end
  end

  @impl true
  def handle(sink, envelope) do
    case Sink.user(fn -> sink.module.handle_event(envelope, sink.user) end) do
      {:ok, {:ok, user}} -> {:ok, [], %{sink | user: user}}
      {:ok, other} -> {:error, {:bad_return, :handle_event, other}}
      {:error, error} -> {:error, error}
    end
  end

  @impl true
  def commit(sink, shard, mark, _done), do: Progress.save(sink.db, %{shard => mark})

  @impl true
  def forget(sink, entity_id) do
    result =
      if function_exported?(sink.module, :forget, 2) do
        case Sink.user(fn -> sink.module.forget(entity_id, sink.user) end) do
          {:ok, {:ok, user}} -> {:ok, %{sink | user: user}}
          {:ok, other} -> {:error, {:bad_return, :forget, other}}
          {:error, error} -> {:error, error}
        end
      else
        {:ok, sink}
      end

    with {:ok, sink} <- result,
         :ok <- Progress.forget(sink.db, entity_id, []) do
      {:ok, sink}
    else
      {:error, error} -> {:error, error, sink}
    end
  end

  @impl true
  def rebuild(sink, _spec, _s) do
    with :ok <- Progress.clear(sink.db), do: start(sink, %{})
  end
end
