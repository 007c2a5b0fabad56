defmodule Kuma.Router do
  @moduledoc false
  # Where a store-level write goes (`Kuma.append/4`, `Kuma.append_batch/3`). A live
  # entity is the only writer of its stream, so a write to an id whose process runs goes
  # through that process (which folds the events into its state); any other write goes
  # straight to the event log, and the entity sees it when it loads. In a cluster this is
  # also where a write finds the node that owns its shard.

  alias Kuma.{Codec, Entity, EventLog, Store, Validate}

  @doc "A store-level append to one entity (see `Kuma.append/4`)."
  @spec append(Store.t(), binary(), term(), keyword()) ::
          {:ok, pos_integer()} | {:ok, pos_integer(), Kuma.Position.t()} | {:error, term()}
  def append(%Store{} = s, entity_id, events, opts) do
    with :ok <- Validate.append(events, opts),
         :ok <- Validate.entity_id(entity_id) do
      events = List.wrap(events)

      case Entity.whereis(s, entity_id) do
        nil -> direct(s, entity_id, events, opts)
        pid -> via(pid, s, entity_id, events, opts)
      end
    end
  end

  defp direct(s, entity_id, events, opts) do
    with {:ok, appended} <- EventLog.append(s, entity_id, events, opts), do: EventLog.answer(appended, opts)
  end

  # If the entity stops meanwhile it is no longer live, and storage can be written directly.
  defp via(pid, s, entity_id, events, opts) do
    GenServer.call(pid, {:append, :any, events, opts}, Keyword.get(opts, :timeout, EventLog.default_timeout()))
  catch
    :exit, {:timeout, _} -> {:error, :timeout}
    :exit, _ -> direct(s, entity_id, events, opts)
  end

  @doc "Appends to many entities (see `Kuma.append_batch/3`)."
  @spec append_batch(Store.t(), list(), keyword()) :: {:ok, [pos_integer()]} | {:error, term()}
  def append_batch(_s, [], _opts), do: {:error, {:invalid, :entries, "must not be empty"}}

  def append_batch(%Store{} = s, entries, opts) when is_list(entries) do
    with :ok <- Validate.keys(opts, [:timeout]),
         :ok <- Validate.timeout(opts),
         {:ok, parsed} <- Validate.each(entries, &entry(s, &1)) do
      timeout = Keyword.get(opts, :timeout, EventLog.default_timeout())
      # Entries of live entities go through their process (the single writer); the rest
      # go to storage in one NIF call.
      {live, cold} =
        parsed
        |> Enum.with_index()
        |> Enum.split_with(fn {entry, _i} -> Entity.whereis(s, entry.id) != nil end)

      with {:ok, cold_results} <- append_cold(s, cold, timeout) do
        live_results =
          Enum.map(live, fn {entry, i} ->
            {i, append(s, entry.id, entry.events, Keyword.put(entry.opts, :timeout, timeout))}
          end)

        (cold_results ++ live_results)
        |> Enum.sort_by(&elem(&1, 0))
        |> Enum.map(&elem(&1, 1))
        |> batch_result()
      end
    end
  end

  def append_batch(_s, _entries, _opts), do: {:error, {:invalid, :entries, "must be a list"}}

  # Validates and encodes one entry; nothing is written unless every entry is valid.
  defp entry(s, {id, events}), do: entry(s, {id, events, []})

  defp entry(s, {id, events, opts}) when is_list(opts) do
    events = List.wrap(events)

    with :ok <- Validate.keys(opts, [:expected_seq, :metadata]),
         :ok <- Validate.entity_id(id),
         {:ok, expected} <- Validate.expected_seq(Keyword.get(opts, :expected_seq)),
         {:ok, encoded} <- Codec.encode_events(events, Keyword.get(opts, :metadata), s) do
      {:ok, %{id: id, events: events, opts: opts, expected: expected, encoded: encoded}}
    end
  end

  defp entry(_s, other),
    do:
      {:error,
       {:invalid, :entries, "expected {entity_id, events} or {entity_id, events, opts}, got: #{inspect(other)}"}}

  defp append_cold(_s, [], _timeout), do: {:ok, []}

  defp append_cold(s, cold, timeout) do
    with {:ok, results} <-
           EventLog.append_batch(s, Enum.map(cold, fn {e, _i} -> {e.id, e.expected, e.encoded} end), timeout) do
      {:ok, Enum.zip_with(cold, results, fn {_entry, i}, result -> {i, last_seq(result)} end)}
    end
  end

  defp last_seq({:ok, appended}), do: EventLog.answer(appended, [])
  defp last_seq(error), do: error

  defp batch_result(results) do
    if Enum.all?(results, &match?({:ok, _}, &1)),
      do: {:ok, Enum.map(results, fn {:ok, seq} -> seq end)},
      else: {:error, {:partial, results}}
  end
end
