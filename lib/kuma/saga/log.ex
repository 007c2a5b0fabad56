defmodule Kuma.Saga.Log do
  @moduledoc """
  The aggregate of a saga's own stream (`"saga:" <> id`; every store knows it). Events:
  `{:saga_started, %{module: module, args: args}}` (a typed event: `resume/2` finds sagas by
  it), `{:step_sent, :run | :undo, index, target_seq}`,
  `{:step_done, :run | :undo, index}`, `{:step_failed, index, reason}`, `{:saga_ended,
  :completed | :compensated}`. The state says where the saga stands.
  """
  @behaviour Kuma.Aggregate

  defstruct module: nil, args: nil, status: :new, done: [], undone: [], pending: nil, failed: nil

  @type t :: %__MODULE__{
          module: module() | nil,
          args: term(),
          status: :new | :running | :compensating | :completed | :compensated,
          done: [non_neg_integer()],
          undone: [non_neg_integer()],
          pending: nil | %{phase: :run | :undo, index: non_neg_integer(), since: non_neg_integer()},
          failed: nil | {non_neg_integer(), term()}
        }

  @impl true
  def init(_id), do: %__MODULE__{}

  @impl true
  # Starting an existing saga writes nothing (run/5 then drives the one recorded).
  def handle(%__MODULE__{status: :new}, {:start, module, args}),
    do: {:ok, [{:saga_started, %{module: module, args: args}}]}

  def handle(%__MODULE__{}, {:start, _module, _args}), do: {:ok, []}

  # A step already pending keeps the seq recorded first: a second driver uses that one.
  def handle(%__MODULE__{pending: %{phase: p, index: i}}, {:record, {:step_sent, p, i, _}}), do: {:ok, []}
  def handle(%__MODULE__{status: :new}, {:record, _event}), do: {:error, :saga_not_started}
  def handle(%__MODULE__{}, {:record, event}), do: {:ok, [event]}

  @impl true
  def apply(log, {:saga_started, %{module: module, args: args}}),
    do: %{log | module: module, args: args, status: :running}

  def apply(log, {:step_sent, phase, index, since}), do: %{log | pending: %{phase: phase, index: index, since: since}}
  def apply(log, {:step_done, :run, index}), do: %{log | done: [index | log.done], pending: nil}
  def apply(log, {:step_done, :undo, index}), do: %{log | undone: [index | log.undone], pending: nil}

  def apply(log, {:step_failed, index, reason}),
    do: %{log | failed: {index, reason}, pending: nil, status: :compensating}

  def apply(log, {:saga_ended, status}), do: %{log | status: status}

  @doc "How an ended saga ended."
  @spec outcome(t()) :: Kuma.Saga.outcome()
  def outcome(%__MODULE__{status: :completed}), do: :completed

  def outcome(%__MODULE__{status: :compensated, failed: {index, reason}} = log) do
    name = Kuma.Saga.steps_of(log.module, log.args) |> Enum.at(index) |> elem(0)
    {:compensated, name, reason}
  end
end
