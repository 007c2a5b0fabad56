defmodule Kuma.Projection.Sink.ReadModel do
  @moduledoc false
  # The sink of a `Kuma.ReadModel`: each event becomes SQL statements, committed with the
  # checkpoint in one transaction of the read model's file, so its rows match its
  # checkpoint exactly, also after `kill -9`.

  use Kuma.Projection.Sink, :durable

  alias Kuma.{Native, Store}
  alias Kuma.Projection.{Progress, Sink}

  defstruct [:db, :module, :name, :store]

  @impl true
  def open(spec, s) do
    identity = %{"store_id" => s.store_id, "kind" => "read_model", "module" => inspect(spec.module)}

    with {:ok, db} <- Progress.open(spec.path, identity, spec.file_mode) do
      with {:ok, checkpoint} <- Progress.checkpoint(db),
           :ok <- schema(db, spec.module) do
        # Queries run in the caller, on the read model's read-only connection.
        Registry.update_value(Kuma.Registry, {:projection, spec.name}, &Map.put(&1, :db, db))
        {:ok, %__MODULE__{db: db, module: spec.module, name: spec.name, store: s}, checkpoint, nil}
      else
        error ->
          Progress.close(db)
          error
      end
    end
  end

  # The schema runs once, when the file is created (and again after a rebuild).
  defp schema(db, module) do
    case Progress.meta(db, "schema") do
      {:ok, nil} ->
        case Progress.create_schema(db, List.wrap(module.schema())) do
          :ok -> :ok
          {:error, reason} -> {:error, {:invalid_schema, module, reason}}
        end

      {:ok, _} ->
        :ok

      error ->
        error
    end
  end

  @impl true
  def handle(sink, envelope) do
    with {:ok, returned} <- Sink.user(fn -> sink.module.handle_event(envelope) end) do
      case statements(returned) do
        {:ok, statements} -> seal_params(sink, statements)
        :error -> {:error, {:bad_return, :handle_event, returned}}
      end
    end
  end

  # A Kuma.Sensitive parameter is stored sealed (see Kuma.Sensitive, "In read models").
  defp seal_params(sink, statements) do
    sealed =
      Enum.map(statements, fn {sql, params} ->
        {sql,
         Enum.map(params, fn
           %Kuma.Sensitive{} = v ->
             case Kuma.Sensitive.to_cell(sink.store, v) do
               {:ok, cell} -> cell
               {:error, reason} -> throw({:sensitive, reason})
             end

           other ->
             other
         end)}
      end)

    {:ok, sealed, sink}
  catch
    {:sensitive, reason} -> {:error, reason}
  end

  @impl true
  def commit(sink, shard, mark, done) do
    case Progress.save(sink.db, %{shard => mark}, Enum.flat_map(done, &elem(&1, 2))) do
      :ok -> :ok
      {:error, _} when done != [] -> commit_one_by_one(sink, shard, done)
      error -> error
    end
  end

  # The batch's statements failed together: commit event by event to find the culprit.
  defp commit_one_by_one(sink, shard, done) do
    Enum.reduce_while(done, :ok, fn {pos, hash, statements}, :ok ->
      case Progress.save(sink.db, %{shard => {pos, hash}}, statements) do
        :ok -> {:cont, :ok}
        {:error, reason} -> {:halt, {:error, {:at, pos, reason}}}
      end
    end)
  end

  @impl true
  def forget(sink, entity_id) do
    with {:ok, returned} <- Sink.user(fn -> sink.module.forget(entity_id) end),
         {:ok, statements} <- forget_statements(sink, entity_id, returned),
         :ok <- Progress.forget(sink.db, entity_id, statements) do
      {:ok, sink}
    else
      {:error, error} -> {:error, error, sink}
    end
  end

  defp forget_statements(sink, entity_id, :default), do: default_forget(sink.db, entity_id)

  defp forget_statements(_sink, _entity_id, returned) do
    case statements(returned) do
      {:ok, statements} -> {:ok, statements}
      :error -> {:error, {:bad_return, :forget, returned}}
    end
  end

  # A read model's file is deleted and created again: its schema and rows start over.
  @impl true
  def rebuild(sink, spec, %Store{} = s) do
    close(sink)
    Progress.delete_files(spec.path)
    open(spec, s)
  end

  # What handle_event/1 or forget/1 returned, as a list of {sql, params}.
  @spec statements(term()) :: {:ok, [Sink.work()]} | :error
  defp statements({sql, params} = one) when is_binary(sql) and is_list(params), do: {:ok, [one]}

  defp statements(list) when is_list(list) do
    if Enum.all?(list, &match?({sql, params} when is_binary(sql) and is_list(params), &1)),
      do: {:ok, list},
      else: :error
  end

  defp statements(_other), do: :error

  # The default forget: DELETE from every table of the read model with an entity_id column.
  defp default_forget(db, entity_id) do
    sql = """
    SELECT m.name FROM sqlite_master m, pragma_table_info(m.name) c
    WHERE m.type = 'table' AND m.name NOT LIKE '\\_kuma\\_%' ESCAPE '\\' AND c.name = 'entity_id'
    """

    with {:ok, {_, rows}} <- Native.sqldb_query(db, sql, [], 5_000) do
      id = if String.valid?(entity_id), do: entity_id, else: {:blob, entity_id}

      {:ok,
       for([table] <- rows, do: {"DELETE FROM \"#{String.replace(table, "\"", "\"\"")}\" WHERE entity_id = ?1", [id]})}
    end
  end
end
