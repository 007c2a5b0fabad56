defmodule Kuma.Projection.Sink do
  @moduledoc false
  # Where a projection's events go. Kuma.Projection.Runner reads the shards, decides about
  # failures and keeps the checkpoint; a sink does what differs between the three kinds of
  # follower:
  #
  # * Kuma.Projection.Sink.Handler - a `Kuma.Projection`: user code folds events into its
  #   state; checkpoint in the projection's file, saved per batch (at-least-once).
  # * Kuma.Projection.Sink.ReadModel - a `Kuma.ReadModel`: events become SQL statements,
  #   committed with the checkpoint in one transaction (exactly once in effect).
  # * Kuma.Projection.Sink.Subscriber - `Kuma.subscribe/2`: events are sent to a process,
  #   whose mailbox bounds how much is read; the checkpoint lives in memory only.
  #
  # `work` is what handling one event produced that must be committed with the checkpoint
  # (a read model's statements; [] for the others). A checkpoint is kept as marks, per shard
  # `{position, hash}` (Kuma.Projection.Progress says why).

  alias Kuma.Projection.{Failure, Spec}

  @type sink :: term()
  @type work :: [{String.t(), list()}]
  @type mark :: {non_neg_integer(), binary() | nil}
  @type marks :: %{non_neg_integer() => mark()}

  @doc "Opens the sink: its state, its stored checkpoint and, if it cannot run yet, why."
  @callback open(Spec.t(), Kuma.Store.t()) :: {:ok, sink(), marks(), stopped :: term() | nil} | {:error, term()}

  @doc "How many events may be read now (a subscriber's mailbox may be full)."
  @callback room(sink(), batch_size :: pos_integer()) :: non_neg_integer()

  @doc "Called once when `room/2` turns 0, with the position delivered so far."
  @callback full(sink(), Kuma.Position.t()) :: :ok

  @doc """
  Whether the sink keeps what it derives durably: then it is told of erasures (`forget/2`)
  and the next batch of a shard is read while this one is handled (a subscriber's reads
  are bounded by its mailbox instead).
  """
  @callback durable?() :: boolean()

  @doc "Hands one event over."
  @callback handle(sink(), Kuma.Envelope.t()) :: {:ok, work(), sink()} | {:error, term()}

  @doc """
  Commits the work of handled events `[{position, hash, work}]` with the shard's new
  checkpoint `mark`. `{:error, {:at, position, reason}}`: the event at `position` failed,
  everything before it is committed; `{:error, reason}`: nothing moved (the file failed).
  """
  @callback commit(sink(), shard :: non_neg_integer(), mark(), [{pos_integer(), binary(), work()}]) ::
              :ok | {:error, {:at, pos_integer(), term()}} | {:error, term()}

  @doc "Parks a failed event: records it and moves the shard's checkpoint past it."
  @callback park(sink(), Failure.t()) :: :ok | {:error, term()}

  @doc "Saves a whole checkpoint (`Kuma.Projection.reset/2`)."
  @callback save(sink(), marks()) :: :ok | {:error, term()}

  @doc "Drops everything derived from an erased entity."
  @callback forget(sink(), entity_id :: binary()) :: {:ok, sink()} | {:error, term(), sink()}

  @doc "Drops the output and the checkpoint and starts again (`Kuma.Projection.rebuild/1`)."
  @callback rebuild(sink(), Spec.t(), Kuma.Store.t()) ::
              {:ok, sink(), marks(), stopped :: term() | nil} | {:error, term()}

  @doc "The parked events, and how many there are."
  @callback parked(sink()) :: {:ok, [map()]} | {:error, term()}
  @callback parked_count(sink()) :: non_neg_integer()

  @doc "Closes the sink."
  @callback close(sink()) :: :ok

  @doc false
  # Runs user code; an exception, exit or throw becomes {:error, {:raised, message}}.
  @spec user((() -> term())) :: {:ok, term()} | {:error, {:raised, String.t()}}
  def user(fun) do
    {:ok, fun.()}
  catch
    kind, reason -> {:error, {:raised, Exception.format(kind, reason, __STACKTRACE__)}}
  end

  @doc false
  # The callbacks every durable sink (one with a projection file, `db`) shares: it reads as
  # much as asked, keeps its checkpoint and parked events in Kuma.Projection.Progress, and
  # is told of erasures.
  defmacro __using__(:durable) do
    quote do
      @behaviour Kuma.Projection.Sink

      @impl true
      def room(_sink, batch_size), do: batch_size

      @impl true
      def full(_sink, _position), do: :ok

      @impl true
      def durable?, do: true

      @impl true
      def park(sink, failure), do: Kuma.Projection.Progress.park(sink.db, failure, failure.attempts)

      @impl true
      def save(sink, checkpoint), do: Kuma.Projection.Progress.save(sink.db, checkpoint)

      @impl true
      def parked(sink), do: Kuma.Projection.Progress.parked(sink.db)

      @impl true
      def parked_count(sink), do: Kuma.Projection.Progress.parked_count(sink.db)

      @impl true
      def close(sink), do: Kuma.Projection.Progress.close(sink.db)
    end
  end
end
