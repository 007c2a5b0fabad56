defmodule Kuma.Query do
  @moduledoc """
  Which events of many entities a reader wants: by type, scope, entity id (or id prefix)
  and time. `Kuma.query/2`, projections (`Kuma.Projection`) and subscriptions
  (`Kuma.subscribe/2`) take the same filter options, parsed by `new/1` into this struct,
  which the shards answer with their indexes before anything is decrypted
  (docs/storage-format.md).

  * `:types` (or `:type`) - event types (strings, or struct modules: see `Kuma.Codec`)
  * `:scope` - a scope, or a scope prefix ending in `*`: `"org:acme/*"` matches
    `"org:acme/x"` and `"org:acme/x/y"`, not `"org:acmex"`
  * `:id_prefix` - entities whose id starts with this
  * `:entity_id` - one entity

      iex> {:ok, q} = Kuma.Query.new(types: [:paid], scope: "org:acme/*")
      iex> {q.types, q.scope}
      {["paid"], {:prefix, "org:acme/"}}
  """

  alias Kuma.{Codec, EventLog, Native, Position, Store, Validate}
  require Native

  defstruct types: [], scope: nil, id_prefix: nil, entity_id: nil, from: nil, to: nil

  @type t :: %__MODULE__{
          types: [String.t()],
          scope: nil | {:exact, String.t()} | {:prefix, String.t()},
          id_prefix: binary() | nil,
          entity_id: binary() | nil,
          from: integer() | nil,
          to: integer() | nil
        }

  @filter_keys [:types, :type, :scope, :id_prefix, :entity_id]
  @max_types 64

  @doc "The filter options this module reads."
  @spec filter_keys() :: [atom()]
  def filter_keys, do: @filter_keys

  @doc """
  Parses filter options (see the moduledoc; other keys are ignored) into a query.
  `{:error, reason}` for a bad value.
  """
  @spec new(keyword()) :: {:ok, t()} | {:error, term()}
  def new(opts) do
    with {:ok, types} <- types(Keyword.get(opts, :types, Keyword.get(opts, :type))),
         {:ok, scope} <- scope(Keyword.get(opts, :scope)),
         {:ok, id_prefix} <- binary_opt(:id_prefix, Keyword.get(opts, :id_prefix)),
         {:ok, entity_id} <- binary_opt(:entity_id, Keyword.get(opts, :entity_id)) do
      {:ok, %__MODULE__{types: types, scope: scope, id_prefix: id_prefix, entity_id: entity_id}}
    end
  end

  defp types(nil), do: {:ok, []}
  defp types(list) when is_list(list) and length(list) <= @max_types, do: Validate.each(list, &type/1)
  defp types(list) when is_list(list), do: {:error, {:too_large, :types, length(list), @max_types}}
  defp types(one), do: types([one])

  defp type(t) when is_binary(t) and t != "", do: {:ok, t}
  defp type(t) when is_atom(t) and t not in [nil, true, false], do: {:ok, Codec.module_type(t)}
  defp type(t), do: {:error, {:invalid, :types, "a type is a non-empty string or an atom, got: #{inspect(t)}"}}

  defp scope(nil), do: {:ok, nil}

  defp scope(scope) when is_binary(scope) do
    case String.split_at(scope, -1) do
      {"", "*"} -> {:ok, {:prefix, ""}}
      {prefix, "*"} -> with({:ok, prefix} <- Codec.check_scope(prefix), do: {:ok, {:prefix, prefix}})
      _ -> with({:ok, scope} <- Codec.check_scope(scope), do: {:ok, {:exact, scope}})
    end
  end

  defp scope(other),
    do: {:error, {:invalid, :scope, "must be a non-empty string (\"org:acme/*\" for a prefix), got: #{inspect(other)}"}}

  defp binary_opt(_key, nil), do: {:ok, nil}
  defp binary_opt(_key, b) when is_binary(b) and b != "", do: {:ok, b}
  defp binary_opt(key, other), do: {:error, {:invalid, key, "must be a non-empty binary, got: #{inspect(other)}"}}

  @doc false
  # Up to `max` matching events of one shard after position `after`, the position the
  # shard was searched up to (reading on from there never skips nor repeats an event), and
  # the chain hash of the event stored at that position (nil if none).
  @spec read_shard(Store.t(), non_neg_integer(), non_neg_integer(), t(), pos_integer()) ::
          {:ok, {[Native.event()], non_neg_integer(), binary() | nil}} | {:error, term()}
  def read_shard(%Store{cluster: nil} = s, shard, after_pos, %__MODULE__{} = query, max) do
    Native.read_query(s.native, shard, after_pos, query, max)
  end

  # Cluster mode: on the shard's leader, which holds every acknowledged write.
  def read_shard(%Store{} = s, shard, after_pos, %__MODULE__{} = query, max) do
    mfa = {__MODULE__, :read_shard_named, [s.name, shard, after_pos, query, max]}
    local = fn -> Native.read_query(s.native, shard, after_pos, query, max) end
    Kuma.Cluster.Route.run(s, shard, mfa, Kuma.EventLog.default_timeout(), local)
  end

  @doc false
  def read_shard_named(name, shard, after_pos, query, max) do
    with {:ok, s} <- Store.lookup(name), do: read_shard(s, shard, after_pos, query, max)
  end

  @doc false
  # The chain hash of the event stored at `pos` in `shard` (nil if none is), and the
  # shard's last position: from the shard's leader in cluster mode.
  @spec read_position(Store.t(), non_neg_integer(), non_neg_integer()) ::
          {:ok, {binary() | nil, non_neg_integer()}} | {:error, term()}
  def read_position(%Store{cluster: nil} = s, shard, pos), do: Native.read_position(s.native, shard, pos)

  def read_position(%Store{} = s, shard, pos) do
    mfa = {__MODULE__, :read_position_named, [s.name, shard, pos]}
    local = fn -> Native.read_position(s.native, shard, pos) end
    Kuma.Cluster.Route.run(s, shard, mfa, Kuma.EventLog.default_timeout(), local)
  end

  @doc false
  def read_position_named(name, shard, pos) do
    with {:ok, s} <- Store.lookup(name), do: read_position(s, shard, pos)
  end

  @doc false
  # Kuma.query/2: the filter, a time range and a position to page from, over every shard.
  @spec run(Store.t(), keyword()) :: {:ok, [Kuma.Envelope.t()]} | {:error, term()}
  def run(%Store{} = s, opts) do
    with :ok <- Validate.keys(opts, [:from, :to, :after, :limit | @filter_keys]),
         {:ok, query} <- new(opts),
         {:ok, from} <- timestamp(:from, Keyword.get(opts, :from)),
         {:ok, to} <- timestamp(:to, Keyword.get(opts, :to)),
         {:ok, after_pos} <- position(Keyword.get(opts, :after, %{})),
         {:ok, limit} <- limit(Keyword.get(opts, :limit, 100)),
         {:ok, per_shard} <- read_shards(s, %{query | from: from, to: to}, after_pos, limit) do
      EventLog.decoding(fn -> {:ok, per_shard |> merge_by_time(limit, []) |> Enum.map(&Codec.envelope(&1, s))} end)
    end
  end

  defp timestamp(_key, nil), do: {:ok, nil}
  defp timestamp(_key, %DateTime{} = t), do: {:ok, DateTime.to_unix(t, :microsecond)}
  defp timestamp(_key, us) when is_integer(us), do: {:ok, us}
  defp timestamp(key, _other), do: {:error, {:invalid, key, "must be a DateTime or microseconds since the epoch"}}

  defp position(p),
    do: if(Position.valid?(p), do: {:ok, p}, else: {:error, {:invalid, :after, "must be a Kuma.Position"}})

  defp limit(n) when is_integer(n) and n in 1..10_000, do: {:ok, n}
  defp limit(_), do: {:error, {:invalid, :limit, "must be 1..10000"}}

  defp read_shards(s, query, after_pos, limit) do
    Enum.reduce_while((s.shards - 1)..0//-1, {:ok, []}, fn shard, {:ok, acc} ->
      case read_shard(s, shard, Map.get(after_pos, shard, 0), query, limit) do
        {:ok, {[], _, _}} -> {:cont, {:ok, acc}}
        {:ok, {events, _searched, _hash}} -> {:cont, {:ok, [{shard, events} | acc]}}
        {:error, reason} -> {:halt, {:error, reason}}
      end
    end)
  end

  # k-way merge of per-shard lists (each in position order) by {timestamp, shard}: taking
  # only from list heads keeps what is taken of each shard a prefix, so paging with :after
  # neither skips nor repeats.
  defp merge_by_time(_lists, 0, acc), do: Enum.reverse(acc)
  defp merge_by_time([], _left, acc), do: Enum.reverse(acc)

  defp merge_by_time(lists, left, acc) do
    {shard, [first | rest]} =
      Enum.min_by(lists, fn {shard, [event | _]} -> {Native.event(event, :timestamp), shard} end)

    lists = if rest == [], do: List.keydelete(lists, shard, 0), else: List.keyreplace(lists, shard, 0, {shard, rest})
    merge_by_time(lists, left - 1, [first | acc])
  end
end
