defmodule Kuma.Telemetry do
  @moduledoc """
  Telemetry events, named and shaped as the Elixir ecosystem expects from `:telemetry`
  (`[:kuma, :append, :stop]`, measurements in native time units, metadata with the store
  name). When the `:telemetry` application is loaded, Kuma's events go through
  `:telemetry.execute/3` and handlers attach with `:telemetry.attach/4` as usual. hex.pm
  (where `:telemetry` comes from) is not reachable where Kuma is built, so Kuma also has a
  tiny dispatcher of its own with the same calls, `attach/4` and `detach/1`, used when
  `:telemetry` is absent (and by Kuma's tests).

  A handler is `fun(event, measurements, metadata, config)`; one that raises is detached
  (as `:telemetry` does) and logged. With no handler attached an event costs one
  `:persistent_term` read.

  | event | measurements | metadata |
  | --- | --- | --- |
  | `[:kuma, :append, :stop]` | `duration`, `events`, `bytes` | `store`, `shard`, `entity_id` |
  | `[:kuma, :append, :exception]` | `duration` | `store`, `entity_id`, `reason` |
  | `[:kuma, :append_batch, :stop]` | `duration`, `entries` (committed), `failed`, `events`, `bytes` | `store` |
  | `[:kuma, :execute, :stop]` | `duration`, `events`, `writes` (commands taken together) | `store`, `aggregate`, `entity_id` |
  | `[:kuma, :load, :stop]` | `duration`, `replayed` (events folded) | `store`, `aggregate`, `entity_id`, `snapshot_seq` |
  | `[:kuma, :snapshot, :stop]` | `duration` (to queue an entity's, to commit a framework's), `bytes`, `seq` | `store`, `entity_id`, `version` |
  | `[:kuma, :erase, :stop]` | `duration`, `events` (deleted) | `store` |
  | `[:kuma, :entity, :passivate]` | (none) | `store`, `aggregate` |
  | `[:kuma, :projection, :batch]` | `duration`, `events`, `lag` (positions behind, all shards) | `store`, `name`, `shard`, `kind` |

  `duration` is in native time units (`System.convert_time_unit/3`); `entity_id` is the
  id as given (mind personal data in ids if handlers export them).
  """

  require Logger

  @key {__MODULE__, :handlers}

  @events [
    [:kuma, :append, :stop],
    [:kuma, :append, :exception],
    [:kuma, :append_batch, :stop],
    [:kuma, :execute, :stop],
    [:kuma, :load, :stop],
    [:kuma, :snapshot, :stop],
    [:kuma, :erase, :stop],
    [:kuma, :entity, :passivate],
    [:kuma, :projection, :batch]
  ]

  @doc "Every event Kuma emits (the table above), to attach one handler to all of them."
  @spec events() :: [list(atom())]
  def events, do: @events

  @typedoc "A handler: called with the event, measurements, metadata and its config."
  @type handler :: (list(atom()), map(), map(), term() -> any())

  @doc """
  Attaches `handler` under `id` to the events `events` (a list of event names).
  `{:error, :already_exists}` if `id` is taken.
  """
  @spec attach(term(), [list(atom())] | list(atom()), handler(), term()) :: :ok | {:error, :already_exists}
  def attach(id, [first | _] = event, handler, config) when is_atom(first), do: attach(id, [event], handler, config)

  def attach(id, events, handler, config) when is_list(events) and is_function(handler, 4) do
    if telemetry?() do
      apply(:telemetry, :attach_many, [id, events, handler, config])
    else
      :global.trans({__MODULE__, self()}, fn ->
        handlers = handlers()

        if Enum.any?(handlers, fn {hid, _, _, _} -> hid == id end) do
          {:error, :already_exists}
        else
          :persistent_term.put(@key, [{id, events, handler, config} | handlers])
          :ok
        end
      end)
    end
  end

  @doc "Detaches the handler `id`: `{:error, :not_found}` if there is none."
  @spec detach(term()) :: :ok | {:error, :not_found}
  def detach(id) do
    if telemetry?() do
      apply(:telemetry, :detach, [id])
    else
      {gone, kept} = Enum.split_with(handlers(), fn {hid, _, _, _} -> hid == id end)
      :persistent_term.put(@key, kept)
      if gone == [], do: {:error, :not_found}, else: :ok
    end
  end

  @doc false
  # Emits an event. `measurements` and `metadata` are maps, or zero-arity functions that
  # build them only when a handler listens.
  @spec execute(list(atom()), map() | (() -> map()), map() | (() -> map())) :: :ok
  def execute(event, measurements, metadata) do
    if telemetry?() do
      apply(:telemetry, :execute, [event, value(measurements), value(metadata)])
    else
      listening = for {id, events, fun, config} <- handlers(), event in events, do: {id, fun, config}
      if listening != [], do: dispatch(listening, event, value(measurements), value(metadata))
      :ok
    end
  end

  @doc false
  # Times `fun` and returns its result. `measure` turns the result into
  # `{measurements, metadata}` (emitted as `prefix ++ [:stop]`), `{:exception,
  # measurements, metadata}` (`prefix ++ [:exception]`) or nil (nothing); `duration`
  # (native units) is added to the measurements.
  @spec span(list(atom()), (() -> result), (result -> {map(), map()} | {:exception, map(), map()} | nil)) :: result
        when result: term()
  def span(prefix, fun, measure) do
    if listening?() do
      t0 = System.monotonic_time()
      result = fun.()
      duration = System.monotonic_time() - t0

      case measure.(result) do
        {:exception, measurements, metadata} ->
          execute(prefix ++ [:exception], Map.put(measurements, :duration, duration), metadata)

        {measurements, metadata} ->
          execute(prefix ++ [:stop], Map.put(measurements, :duration, duration), metadata)

        nil ->
          :ok
      end

      result
    else
      fun.()
    end
  end

  @doc false
  @spec listening?() :: boolean()
  def listening?, do: telemetry?() or handlers() != []

  defp dispatch(listening, event, measurements, metadata) do
    for {id, fun, config} <- listening do
      try do
        fun.(event, measurements, metadata, config)
      catch
        kind, reason ->
          detach(id)

          Logger.error(
            "Kuma.Telemetry: handler #{inspect(id)} failed and was detached: " <>
              Exception.format(kind, reason, __STACKTRACE__)
          )
      end
    end
  end

  defp value(f) when is_function(f, 0), do: f.()
  defp value(map), do: map

  defp handlers, do: :persistent_term.get(@key, [])

  defp telemetry?, do: function_exported?(:telemetry, :execute, 3)
end
