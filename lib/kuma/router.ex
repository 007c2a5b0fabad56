defmodule Kuma.Router do
  @moduledoc false
  # Where a store-level write goes (`Kuma.append/4`, `Kuma.append_batch/3`). A live
  # entity is the only writer of its stream, so a write to an id whose process runs goes
  # through that process (which folds the events into its state); any other write goes
  # straight to the event log, and the entity sees it when it loads. In a cluster this is
  # also where a write finds the node that owns its shard.

  alias Kuma.{Codec, Entity, EventLog, Store, Validate}
  alias Kuma.Cluster.Route

  @doc "A store-level append to one entity (see `Kuma.append/4`)."
  @spec append(Store.t(), binary(), term(), keyword()) ::
          {:ok, pos_integer()} | {:ok, pos_integer(), Kuma.Position.t()} | {:error, term()}
  def append(%Store{} = s, entity_id, events, opts) do
    with :ok <- Validate.append(events, opts),
         :ok <- Validate.entity_id(entity_id) do
      events = List.wrap(events)

      case s.cluster do
        nil ->
          here(s, entity_id, events, opts)

        _ ->
          # Cluster mode: on the shard's leader, as one command through every retry.
          opts = Route.command_id(s, opts)
          timeout = Keyword.get(opts, :timeout, EventLog.default_timeout())
          mfa = {__MODULE__, :append_named, [s.name, entity_id, events, opts]}
          Route.run(s, Route.shard(s, entity_id), mfa, timeout, fn -> here(s, entity_id, events, opts) end, write: true)
      end
    end
  end

  @doc false
  # `append/4` by store name (what a call routed from another node runs).
  def append_named(name, entity_id, events, opts) do
    with {:ok, s} <- Store.lookup(name), do: append(s, entity_id, events, opts)
  end

  defp here(s, entity_id, events, opts) do
    case Entity.whereis(s, entity_id) do
      nil -> direct(s, entity_id, events, opts)
      pid -> via(pid, s, entity_id, events, opts)
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

  def append_batch(%Store{cluster: nil} = s, entries, opts) when is_list(entries) do
    with :ok <- Validate.keys(opts, [:timeout]),
         :ok <- Validate.timeout(opts),
         {:ok, parsed} <- Validate.each(entries, &entry(s, &1)) do
      write_parsed(s, parsed, Keyword.get(opts, :timeout, EventLog.default_timeout()))
    end
  end

  # Cluster mode: the entries of each shard go to its leader, together, in parallel; each
  # entry is one command through every retry.
  def append_batch(%Store{} = s, entries, opts) when is_list(entries) do
    with :ok <- Validate.keys(opts, [:timeout]),
         :ok <- Validate.timeout(opts),
         {:ok, parsed} <- Validate.each(entries, &entry(s, &1)) do
      timeout = Keyword.get(opts, :timeout, EventLog.default_timeout())

      parsed
      |> Enum.with_index()
      |> Enum.group_by(fn {e, _i} -> Route.shard(s, e.id) end)
      |> Enum.map(fn {shard, group} ->
        raw = for {e, _i} <- group, do: {e.id, e.events, Route.command_id(s, e.opts)}
        mfa = {__MODULE__, :shard_batch_named, [s.name, raw, timeout]}
        local = fn -> shard_batch(s, raw, timeout) end
        {group, Task.async(fn -> Route.run(s, shard, mfa, timeout, local, write: true) end)}
      end)
      |> Enum.flat_map(fn {group, task} -> spread(group, Task.await(task, :infinity)) end)
      |> Enum.sort_by(&elem(&1, 0))
      |> Enum.map(&elem(&1, 1))
      |> batch_result()
    end
  end

  def append_batch(_s, _entries, _opts), do: {:error, {:invalid, :entries, "must be a list"}}

  @doc false
  # The entries of one shard, on its leader (cluster mode; what a routed call runs).
  def shard_batch_named(name, raw, timeout) do
    with {:ok, s} <- Store.lookup(name), do: shard_batch(s, raw, timeout)
  end

  # A leader that lost the shard meanwhile, or a batch whose outcome is unknown, is tried
  # again as a whole (Kuma.Cluster.Route): each entry keeps its command id, so those that
  # were written are answered, not written twice.
  defp shard_batch(s, raw, timeout) do
    with {:ok, parsed} <- Validate.each(raw, &entry(s, &1)) do
      case write_parsed(s, parsed, timeout) do
        {:error, {:partial, results}} = partial ->
          Enum.find(results, partial, fn r ->
            match?({:error, :not_leader}, r) or match?({:error, {:outcome_unknown, _}}, r)
          end)

        other ->
          other
      end
    end
  end

  # One shard group's answer, spread over its entries' places.
  defp spread(group, {:ok, seqs}), do: Enum.zip_with(group, seqs, fn {_e, i}, seq -> {i, {:ok, seq}} end)
  defp spread(group, {:error, {:partial, results}}), do: Enum.zip_with(group, results, fn {_e, i}, r -> {i, r} end)
  defp spread(group, {:error, _} = error), do: Enum.map(group, fn {_e, i} -> {i, error} end)

  # Entries of live entities go through their process (the single writer); the rest go to
  # storage in one call.
  defp write_parsed(s, parsed, timeout) do
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

  # Validates and encodes one entry; nothing is written unless every entry is valid.
  defp entry(s, {id, events}), do: entry(s, {id, events, []})

  defp entry(s, {id, events, opts}) when is_list(opts) do
    events = List.wrap(events)

    with :ok <- Validate.keys(opts, [:expected_seq, :metadata, :kuma_command_id]),
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
    entries =
      case s.cluster do
        nil -> Enum.map(cold, fn {e, _i} -> {e.id, e.expected, e.encoded} end)
        _ -> Enum.map(cold, fn {e, _i} -> {e.id, e.expected, e.encoded, Keyword.get(e.opts, :kuma_command_id)} end)
      end

    with {:ok, results} <- EventLog.append_batch(s, entries, timeout) do
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
