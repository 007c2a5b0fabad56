defmodule Kuma.Saga do
  @moduledoc """
  Sagas (process managers): a sequence of commands to other entities, each undone by a
  compensating command when a later one fails. A transfer debits one account, then credits
  another; if the credit is refused (a closed account, a limit) or times out without being
  applied, the debit is refunded.

      defmodule Bank.Transfer do
        @behaviour Kuma.Saga

        @impl true
        def steps(%{from: from, to: to, amount: amount}) do
          [
            {:debit, {Bank.Account, from, {:withdraw, amount}}, {Bank.Account, from, {:deposit, amount}}},
            {:credit, {Bank.Account, to, {:deposit, amount}}}
          ]
        end
      end

      {:ok, :completed} = Kuma.Saga.run(:bank, Bank.Transfer, "t-1", %{from: "a", to: "b", amount: 5})

  A step is `{name, {aggregate, entity_id, command}}` or, with its compensation,
  `{name, {aggregate, entity_id, command}, {aggregate, entity_id, command}}`, or the Gleam
  record `saga.Step(name, run, undo: [compensation])` (`{:step, name, run, []}` or with one
  compensation in the list); an aggregate may be given by its Erlang module name as a
  string (`"bank@account"`). Steps run in
  order; a step refused by its aggregate (`{:error, reason}` from `handle/2`) or that timed
  out without being applied stops the saga, and the compensations of the steps done so far
  run in reverse order. The outcome is `:completed` or `{:compensated, step, reason}`.

  ## Durable, and exactly once

  A saga's progress is the event stream of its own entity, `"saga:" <> id` (aggregate
  `Kuma.Saga.Log`, which every store knows): started, each step sent (with the target's
  seq at that moment), done or failed, ended. It survives restarts and `kill -9`, and is
  exported and erased like any entity. `resume/2` finds every saga not ended (by the type
  of their first event) and drives each on from where its log stands.

  Every command a saga sends is idempotent (`Kuma.Entity.execute/3` with `command_id:
  "<saga id>/<step>/run"` or `".../undo"` and `since_seq:` the target's seq recorded before
  it was sent): a step sent again after a crash, or after a timeout, is applied at most
  once. A step that timed out is settled with `Kuma.Entity.applied?/3`, answered by the
  target's process after the timed-out command, so a command is never compensated while it
  might still apply. If even that gets no answer, `run/5` returns `{:error, {:pending,
  id}}` and the saga stays where it is, for `resume/2`.

  Starting is idempotent too: `run/5` with the id of a saga that exists drives that saga
  (its recorded steps and arguments, not the ones given). Start sagas from events by
  deriving the saga id from the event (`Kuma.Envelope.event_id/1`) in a projection or
  persistent subscription handler: an event handled twice starts one saga.

  Single node only for now (idempotent commands are single-node).

  Options of `run/5` and `resume/2`: `:step_timeout` (ms per attempt, default 5,000),
  `:settle_timeout` (ms for `applied?/3` after a timeout, default 30,000).
  """

  alias Kuma.Saga.Log

  @typedoc "A command to an entity: `{aggregate, entity_id, command}`."
  @type command :: {module(), binary(), term()}

  @typedoc "A step: its name, its command, and optionally the command that undoes it."
  @type step :: {atom(), command()} | {atom(), command(), command()}

  @typedoc "How a saga ended."
  @type outcome :: :completed | {:compensated, atom(), term()}

  @doc "The steps of the saga started with `args`; must be deterministic (it is called again on resume)."
  @callback steps(args :: term()) :: [step()]

  @doc """
  Starts the saga `id` of `module` with `args` (or, if it exists, drives it on) and runs it
  to its end: `{:ok, :completed}`, `{:ok, {:compensated, step, reason}}`, or `{:error,
  reason}` (`{:pending, id}`: a step's outcome could not be settled yet; `resume/2` goes on).
  """
  @spec run(Kuma.store(), module(), binary(), term(), keyword()) :: {:ok, outcome()} | {:error, term()}
  def run(store, module, id, args, opts \\ []) when is_atom(module) and is_binary(id) do
    log = entity(store, id)

    with {:ok, _} <- Kuma.execute(log, {:start, module, args}) do
      drive(store, id, log, opts)
    end
  end

  @doc """
  Drives every saga of `store` that has not ended to its end, `:max_concurrency` at a
  time (default 100). Returns `{:ok, %{saga_id => {:ok, outcome} | {:error, reason}}}`.
  """
  @spec resume(Kuma.store(), keyword()) :: {:ok, %{binary() => {:ok, outcome()} | {:error, term()}}} | {:error, term()}
  def resume(store, opts \\ []) do
    with {:ok, ids} <- started(store, nil, []) do
      results =
        ids
        |> Task.async_stream(
          # An ended saga answers its outcome (drive/4 reads the log first).
          fn id -> {id, drive(store, id, entity(store, id), opts)} end,
          max_concurrency: Keyword.get(opts, :max_concurrency, 100),
          timeout: :infinity,
          ordered: false
        )
        |> Map.new(fn {:ok, pair} -> pair end)

      {:ok, results}
    end
  end

  @doc "A saga's log as it stands: `{:ok, %Kuma.Saga.Log{}}` (status `:new` if it never started)."
  @spec status(Kuma.store(), binary()) :: {:ok, Log.t()} | {:error, term()}
  def status(store, id), do: Kuma.fetch(entity(store, id))

  defp entity(store, id), do: Kuma.entity(store, Log, "saga:" <> id)

  # Every saga id, from the "saga_started" events (paged).
  defp started(store, after_pos, acc) do
    opts = [types: ["saga_started"], limit: 10_000] ++ if(after_pos, do: [after: after_pos], else: [])

    case Kuma.query(store, opts) do
      {:ok, []} ->
        {:ok, acc |> Enum.reverse() |> Enum.uniq()}

      {:ok, envelopes} ->
        ids = for %{entity_id: "saga:" <> id} <- envelopes, do: id
        started(store, Kuma.Position.merge(after_pos || %{}, Kuma.Position.of(envelopes)), Enum.reverse(ids, acc))

      error ->
        error
    end
  end

  # -- driving ---------------------------------------------------------------------------

  defp drive(store, id, log, opts) do
    case Kuma.fetch(log) do
      {:ok, %Log{status: status} = l} when status in [:completed, :compensated] ->
        {:ok, Log.outcome(l)}

      {:ok, %Log{} = l} ->
        case next(l, steps_of(l.module, l.args)) do
          {:end, status} ->
            with {:ok, _} <- record(log, {:saga_ended, status}), do: drive(store, id, log, opts)

          {:send, phase, index, {aggregate, target, command}} ->
            with :ok <- send_step(store, id, log, l, phase, index, aggregate, target, command, opts),
                 do: drive(store, id, log, opts)

          {:skip, index} ->
            with {:ok, _} <- record(log, {:step_done, :undo, index}), do: drive(store, id, log, opts)
        end

      error ->
        error
    end
  end

  # What comes next, from the log and the steps.
  defp next(%Log{failed: nil, done: done}, steps) when length(done) == length(steps), do: {:end, :completed}

  defp next(%Log{failed: nil, done: done}, steps) do
    index = length(done)
    {:send, :run, index, command_of(Enum.at(steps, index))}
  end

  defp next(%Log{done: done, undone: undone}, steps) do
    case Enum.reject(done, &(&1 in undone)) do
      [] ->
        {:end, :compensated}

      [index | _] ->
        case Enum.at(steps, index) do
          {_name, _run, nil} -> {:skip, index}
          {_name, _run, undo} -> {:send, :undo, index, undo}
        end
    end
  end

  defp command_of({_name, run, _undo}), do: run

  @doc false
  # The saga's steps as {name, {aggregate, id, command}, compensation | nil}.
  @spec steps_of(module(), term()) :: [{term(), command(), command() | nil}]
  def steps_of(module, args), do: Enum.map(module.steps(args), &step/1)

  defp step({name, run}), do: {name, command(run), nil}
  defp step({name, run, undo}), do: {name, command(run), undo && command(undo)}
  defp step({:step, name, run, []}), do: {name, command(run), nil}
  defp step({:step, name, run, [undo]}), do: {name, command(run), command(undo)}
  defp step(other), do: raise(ArgumentError, "not a saga step: #{inspect(other)}")

  defp command({aggregate, id, command}) when is_binary(aggregate), do: {String.to_atom(aggregate), id, command}
  defp command({aggregate, id, command}) when is_atom(aggregate), do: {aggregate, id, command}

  # Records the step as sent (unless it already is: then its recorded seq stands), sends
  # it as an idempotent command, and records what came of it.
  defp send_step(store, id, log, l, phase, index, aggregate, target, command, opts) do
    command_id = "#{id}/#{index}/#{phase}"

    with {:ok, since} <- since(store, l, phase, index, target),
         {:ok, _} <- record(log, {:step_sent, phase, index, since}),
         {:ok, %Log{pending: %{since: since}}} <- Kuma.fetch(log) do
      target_entity = Kuma.entity(store, aggregate, target)

      attempt =
        Kuma.execute(target_entity, command, command_id: command_id, since_seq: since, timeout: step_timeout(opts))

      case settle(attempt, target_entity, command_id, since, opts) do
        :applied -> ok(record(log, {:step_done, phase, index}))
        {:refused, reason} when phase == :run -> ok(record(log, {:step_failed, index, reason}))
        {:refused, reason} -> {:error, {:compensation_refused, id, index, reason}}
        :unsettled -> {:error, {:pending, id}}
      end
    end
  end

  # The target's seq before the command is first sent (a pending step keeps its own).
  defp since(_store, %Log{pending: %{phase: phase, index: index, since: since}}, phase, index, _target),
    do: {:ok, since}

  defp since(store, _l, _phase, _index, target) do
    case Kuma.head(store, target) do
      {:ok, nil} -> {:ok, 0}
      {:ok, %{seq: seq}} -> {:ok, seq}
      error -> error
    end
  end

  defp settle({:ok, _seq}, _entity, _command_id, _since, _opts), do: :applied

  defp settle({:error, reason}, entity, command_id, since, opts)
       when reason in [:timeout] or elem(reason, 0) == :entity_down do
    case Kuma.Entity.applied?(entity, command_id, since_seq: since, timeout: Keyword.get(opts, :settle_timeout, 30_000)) do
      {:ok, true} -> :applied
      {:ok, false} -> {:refused, reason}
      {:error, _} -> :unsettled
    end
  end

  defp settle({:error, reason}, _entity, _command_id, _since, _opts), do: {:refused, reason}

  defp step_timeout(opts), do: Keyword.get(opts, :step_timeout, 5_000)

  defp record(log, event), do: Kuma.execute(log, {:record, event})

  defp ok({:ok, _}), do: :ok
  defp ok(error), do: error
end
