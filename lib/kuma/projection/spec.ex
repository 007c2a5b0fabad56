defmodule Kuma.Projection.Spec do
  @moduledoc false
  # The validated options of one projection, read model or subscription: what
  # Kuma.Projection.Runner runs. Built from `Kuma.Projection.start/3`,
  # `Kuma.ReadModel.start/3`, the store's `projections:` option, or `Kuma.subscribe/2`.

  alias Kuma.{Position, Query, Validate}
  alias Kuma.Projection.Sink

  @enforce_keys [:name, :store, :kind, :sink, :query]
  defstruct @enforce_keys ++
              [
                module: nil,
                args: [],
                on_error: :park,
                max_retries: 3,
                retry_backoff: 100,
                batch_size: 500,
                checkpoint: :durable,
                path: nil,
                file_mode: 0o600,
                restart: :permanent,
                subscriber: nil,
                from: %{},
                max_queue: nil,
                epoch: nil
              ]

  @type kind :: :projection | :read_model | :subscription
  @type t :: %__MODULE__{
          name: atom() | reference(),
          store: atom(),
          kind: kind(),
          sink: module(),
          query: Query.t(),
          module: module() | nil,
          args: term(),
          on_error: :park | :stop,
          max_retries: non_neg_integer(),
          retry_backoff: pos_integer(),
          batch_size: pos_integer(),
          checkpoint: :durable | :memory,
          path: Path.t() | nil,
          file_mode: non_neg_integer(),
          restart: :permanent | :temporary,
          subscriber: pid() | nil,
          from: :now | Position.t(),
          max_queue: pos_integer() | nil,
          epoch: non_neg_integer() | nil
        }

  @start_keys [:name, :args, :on_error, :max_retries, :retry_backoff, :batch_size, :checkpoint, :path] ++
                (Query.filter_keys() -- [:type, :entity_id])
  @subscribe_keys [:from, :max_queue | Query.filter_keys()]

  @doc """
  A projection's or read model's spec. `store` needs `:name` and `:data_dir` (a store, or
  the config of one being started).
  """
  @spec new(map(), :projection | :read_model, module(), keyword()) :: {:ok, t()} | {:error, term()}
  def new(store, kind, module, opts) do
    with :ok <- Validate.keys(opts, @start_keys),
         :ok <- check_module(kind, module),
         defaults = if(function_exported?(module, :filter, 0), do: module.filter(), else: []),
         {:ok, query} <- Query.new(Keyword.merge(defaults, opts)),
         name = Keyword.get(opts, :name, module),
         :ok <- check(:name, name, is_atom(name) and name not in [nil, true, false]),
         on_error = Keyword.get(opts, :on_error, :park),
         :ok <- check(:on_error, on_error, on_error in [:park, :stop]),
         max_retries = Keyword.get(opts, :max_retries, 3),
         :ok <- check(:max_retries, max_retries, is_integer(max_retries) and max_retries >= 0),
         backoff = Keyword.get(opts, :retry_backoff, 100),
         :ok <- check(:retry_backoff, backoff, is_integer(backoff) and backoff > 0),
         batch = Keyword.get(opts, :batch_size, 500),
         :ok <- check(:batch_size, batch, is_integer(batch) and batch in 1..100_000),
         checkpoint = Keyword.get(opts, :checkpoint, :durable),
         :ok <- check(:checkpoint, checkpoint, checkpoint in [:durable, :memory]) do
      dir = Map.get(store, :projections_dir) || Path.join(store.data_dir, "projections")
      path = Keyword.get(opts, :path) || Path.join(dir, file_name(name) <> ".sqlite")

      {:ok,
       %__MODULE__{
         name: name,
         store: store.name,
         kind: kind,
         sink: if(kind == :read_model, do: Sink.ReadModel, else: Sink.Handler),
         query: query,
         module: module,
         args: Keyword.get(opts, :args, []),
         on_error: on_error,
         max_retries: max_retries,
         retry_backoff: backoff,
         batch_size: batch,
         checkpoint: checkpoint,
         path: Path.expand(to_string(path)),
         file_mode: Map.get(store, :file_mode, 0o600)
       }}
    end
  end

  @doc "The specs of the store's `projections:` option (`[Module | {Module, opts}]`)."
  @spec configured(term(), map()) :: {:ok, [t()]} | {:error, term()}
  def configured(list, store) when is_list(list) do
    with {:ok, specs} <- Validate.each(list, &configured_one(&1, store)) do
      names = Enum.map(specs, & &1.name)

      if length(Enum.uniq(names)) == length(names),
        do: {:ok, specs},
        else: {:error, {:invalid, :projections, "two projections have the same name"}}
    end
  end

  def configured(_other, _store), do: {:error, {:invalid, :projections, "must be a list of modules or {module, opts}"}}

  defp configured_one({module, opts}, store) when is_list(opts), do: new(store, kind(module), module, opts)
  defp configured_one(module, store) when is_atom(module), do: new(store, kind(module), module, [])

  defp configured_one(other, _store),
    do: {:error, {:invalid, :projections, "expected a module or {module, opts}, got: #{inspect(other)}"}}

  # A module with schema/0 is a read model.
  defp kind(module) do
    if Code.ensure_loaded?(module) and function_exported?(module, :schema, 0), do: :read_model, else: :projection
  end

  @doc "A subscription's spec (see `Kuma.subscribe/2`), for the calling process."
  @spec subscription(Kuma.Store.t(), keyword()) :: {:ok, t()} | {:error, term()}
  def subscription(store, opts) do
    max_queue = Keyword.get(opts, :max_queue, 10_000)

    with :ok <- Validate.keys(opts, @subscribe_keys),
         {:ok, query} <- Query.new(opts),
         {:ok, from} <- from(Keyword.get(opts, :from, :now)),
         :ok <- Validate.positive(:max_queue, max_queue) do
      {:ok,
       %__MODULE__{
         name: make_ref(),
         store: store.name,
         kind: :subscription,
         sink: Sink.Subscriber,
         query: query,
         max_retries: 0,
         batch_size: min(500, max_queue),
         checkpoint: :memory,
         restart: :temporary,
         subscriber: self(),
         from: from,
         max_queue: max_queue
       }}
    end
  end

  defp from(:now), do: {:ok, :now}
  defp from(:start), do: {:ok, %{}}

  defp from(position) do
    if Position.valid?(position),
      do: {:ok, position},
      else: {:error, {:invalid, :from, "must be :now, :start or a Kuma.Position"}}
  end

  defp check_module(kind, module) do
    needed = if kind == :read_model, do: [schema: 0, handle_event: 1], else: [init: 1, handle_event: 2]

    cond do
      not is_atom(module) or not Code.ensure_loaded?(module) ->
        {:error, {:invalid, :module, "#{inspect(module)} is not a loaded module"}}

      missing = Enum.find(needed, fn {f, a} -> not function_exported?(module, f, a) end) ->
        {f, a} = missing
        {:error, {:invalid, :module, "#{inspect(module)} does not define #{f}/#{a}"}}

      true ->
        :ok
    end
  end

  defp check(_key, _value, true), do: :ok
  defp check(key, value, false), do: {:error, {:invalid, key, "not a valid value: #{inspect(value)}"}}

  defp file_name(name), do: name |> Kuma.Codec.module_type() |> String.replace(~r/[^A-Za-z0-9_.-]/, "_")
end
