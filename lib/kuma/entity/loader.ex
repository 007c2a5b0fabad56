defmodule Kuma.Entity.Loader do
  @moduledoc false
  # Rebuilds an entity's state from storage: the latest valid snapshot at or before the
  # target seq, then the events after it, each upcast (store, then aggregate) and folded
  # with `apply/2`. Used for cold loads and for time travel (`Kuma.read_at/2`).
  #
  # A snapshot is valid when its version equals the aggregate's `snapshot_version/0`, it
  # decodes, and its recorded hash equals the stored hash of the event at its seq (so a
  # snapshot can never describe a history other than the one in the shard). An invalid
  # snapshot is ignored and the state is rebuilt from seq 1.

  alias Kuma.{Aggregate, Codec, EventLog, Native, Store}
  require Native

  @type loaded :: %{
          state: term(),
          seq: non_neg_integer(),
          hash: binary() | nil,
          timestamp: integer() | nil,
          snapshot_seq: non_neg_integer(),
          replayed: non_neg_integer()
        }

  @doc "Loads the entity up to `upto` (a seq, or `:head`)."
  @spec load(Store.t(), module(), binary(), non_neg_integer() | :head) :: {:ok, loaded()} | {:error, term()}
  def load(%Store{} = s, aggregate, id, upto \\ :head) do
    # [:kuma, :load, :stop] (Kuma.Telemetry).
    Kuma.Telemetry.span([:kuma, :load], fn -> do_load(s, aggregate, id, upto) end, fn
      {:ok, loaded} ->
        {%{replayed: loaded.replayed},
         %{store: s.name, aggregate: aggregate, entity_id: id, snapshot_seq: loaded.snapshot_seq}}

      _ ->
        nil
    end)
  end

  defp do_load(s, aggregate, id, upto) do
    with {:ok, head} <- EventLog.head(s, id) do
      target =
        case {head, upto} do
          {nil, _} -> 0
          {%{seq: seq}, :head} -> seq
          {%{seq: seq}, n} -> min(seq, n)
        end

      fresh = %{state: nil, seq: 0, hash: nil, timestamp: nil, snapshot_seq: 0, replayed: 0}

      with {:ok, init} <- safe(fn -> aggregate.init(id) end, {:init_failed, 0}),
           {:ok, start} <- start_point(s, aggregate, id, target, %{fresh | state: init}) do
        replay(s, aggregate, id, target, start)
      end
    end
  end

  defp start_point(_s, _aggregate, _id, 0, fresh), do: {:ok, fresh}

  defp start_point(s, aggregate, id, target, fresh) do
    case Native.read_snapshot(s.native, id, Aggregate.snapshot_version(aggregate), target) do
      {:ok, %{seq: seq, timestamp: ts, hash: hash, data: data}} ->
        with {:ok, [Native.event(seq: ^seq, hash: ^hash)]} <- Native.read_entity(s.native, id, seq, 1),
             {:ok, state} <- safe(fn -> Codec.decode_stored(data, "", id, seq, s, id) end, :bad_snapshot) do
          {:ok, %{fresh | state: state, seq: seq, hash: hash, timestamp: ts, snapshot_seq: seq}}
        else
          # Stale, foreign or undecodable snapshot: rebuild from the events instead.
          {:ok, _} -> {:ok, fresh}
          {:error, :bad_snapshot} -> {:ok, fresh}
          {:error, reason} -> {:error, reason}
        end

      {:ok, nil} ->
        {:ok, fresh}

      {:error, reason} ->
        {:error, reason}
    end
  end

  # Folds the events after the start point up to `target`, each decoded, upcast (store,
  # then aggregate) and applied; a failure names the event's seq.
  defp replay(_s, _aggregate, _id, target, %{seq: seq} = acc) when seq >= target, do: {:ok, acc}

  defp replay(s, aggregate, id, target, acc) do
    step = fn event, acc ->
      seq = Native.event(event, :seq)

      apply_one = fn ->
        envelope = Codec.envelope(event, s)
        {aggregate.apply(acc.state, upcast(aggregate, envelope)), envelope}
      end

      case safe(apply_one, {:replay_failed, seq}) do
        {:ok, {state, e}} ->
          {:cont, %{acc | state: state, seq: seq, hash: e.hash, timestamp: e.timestamp, replayed: acc.replayed + 1}}

        error ->
          {:halt, error}
      end
    end

    case EventLog.reduce(s, id, acc.seq + 1, target - acc.seq, acc, step) do
      {:ok, %{seq: ^target} = acc} -> {:ok, acc}
      {:ok, acc} -> {:error, {:replay_failed, acc.seq + 1, :missing_events}}
      {:error, _} = error -> error
    end
  end

  @doc "An event's data after the aggregate's own upcaster (the store's already ran)."
  @spec upcast(module(), Kuma.Envelope.t()) :: term()
  def upcast(aggregate, envelope) do
    if function_exported?(aggregate, :upcast, 2),
      do: aggregate.upcast(envelope.data, envelope),
      else: envelope.data
  end

  # Runs user code (or decoding) and turns a raise/throw/exit into {:error, {tag..., reason}}.
  defp safe(fun, tag) do
    {:ok, fun.()}
  catch
    kind, reason ->
      error = format(kind, reason, __STACKTRACE__)

      case tag do
        :bad_snapshot -> {:error, :bad_snapshot}
        {name, seq} -> {:error, {name, seq, error}}
      end
  end

  @doc false
  # One line naming what user code raised, threw or exited with.
  def format(kind, reason, stack), do: Exception.format_banner(kind, reason, stack)
end
