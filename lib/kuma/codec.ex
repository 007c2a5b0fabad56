defmodule Kuma.Codec do
  @moduledoc """
  How Kuma turns events and metadata into bytes, and how it derives an event's type.

  ## Payload

  An event can be any Elixir term. It is stored as `:erlang.term_to_binary(event)` (the
  whole term, so reading it back gives exactly what was appended) and read back with
  `:erlang.binary_to_term(bytes, [:safe])` first. `:safe` refuses to create atoms, and an
  atom used by an event may legitimately not exist yet in this VM: after a restart, modules
  load lazily outside releases. What happens then depends on the store's `:decode` option:

  * `:trusted` (default) - Kuma loads the module named by the event's type and, if the atom
    is still unknown, decodes without `:safe`, creating it. Kuma's files are written only by
    Kuma, as Mnesia's and DETS's are; someone able to write them could do worse than add atoms.
  * `:safe` - never create atoms: after trying to load the type's module, reading raises
    `Kuma.DecodeError` naming the entity and seq.

  ## Type

  Every event has a type string, stored in its own column for queries and shown in
  `Kuma.Envelope`:

  | event                          | type             |
  | ------------------------------ | ---------------- |
  | `%Bank.Credited{amount: 5}`    | `"Bank.Credited"` (module name without `Elixir.`) |
  | `{:credited, %{amount: 5}}`    | `"credited"`     |
  | `{"credited", %{amount: 5}}`   | `"credited"`     |
  | `{:moved, from, to}` (a tagged tuple of any size, as Erlang records and Gleam custom types are) | `"moved"` |
  | anything else                  | `""` (untyped)   |

  ## Metadata

  The `:metadata` option of an append is a map stored with every event of the append, or a
  list of maps, one per event, in the order of the events (what frameworks carry per event:
  an event id, causation and correlation ids). Each is stored as `term_to_binary(map)`, or
  as an empty binary when absent or empty, and read back as a map (`Kuma.Envelope`'s
  `:metadata`, and in exports).

  ## Scope

  A `:scope` key in an event's metadata (a non-empty string of at most 255 bytes, such as
  `"org:acme/team:7"`) is also stored in clear in an indexed column, so `Kuma.query/2` and
  projection filters can find events by scope or scope prefix across entities. Like entity
  ids and event types, scopes are not encrypted: keep personal data out of them.

      iex> Kuma.Codec.event_type({:credited, %{amount: 5}})
      "credited"
      iex> Kuma.Codec.event_type({:user_created, "Dwighson", "architect"})
      "user_created"
      iex> Kuma.Codec.event_type(%URI{})
      "URI"
      iex> Kuma.Codec.event_type(42)
      ""
  """

  require Kuma.Native

  @doc "The type string of an event (see the table in the moduledoc)."
  @spec event_type(term()) :: String.t()
  def event_type(%module{}), do: module_type(module)
  def event_type({type, _data}) when is_atom(type) and type not in [nil, true, false], do: Atom.to_string(type)
  def event_type({type, _data}) when is_binary(type), do: type

  def event_type(tagged)
      when is_tuple(tagged) and tuple_size(tagged) > 2 and is_atom(elem(tagged, 0)) and
             elem(tagged, 0) not in [nil, true, false],
      do: Atom.to_string(elem(tagged, 0))

  def event_type(_event), do: ""

  @doc false
  # The type of a struct module's events: its name without "Elixir.".
  @spec module_type(atom()) :: String.t()
  def module_type(module) do
    case Atom.to_string(module) do
      "Elixir." <> name -> name
      name -> name
    end
  end

  @doc """
  Encodes the events of one append and its metadata for storage, each event once.

  `Kuma.Sensitive` values in events or metadata are sealed under their subject's key and
  stored without their clear value (this needs the store). `holder`, an entity id or
  `nil`, is recorded as holding the revealed values (its process keeps them in its state;
  see `Kuma.Sensitive`).

  Returns `{:ok, %{encoded: [{type, metadata, payload, scope | nil}], bytes: total,
  events: events}}`, where `events` are the events as the entity folds them (sensitive
  values sealed, clear values kept in memory).
  """
  @spec encode_events([term()], map() | nil, Kuma.Store.t() | nil, binary() | nil) ::
          {:ok, %{encoded: [tuple()], bytes: non_neg_integer(), events: [term()]}} | {:error, term()}
  def encode_events(events, metadata, store \\ nil, holder \\ nil)
  def encode_events([], _metadata, _store, _holder), do: {:error, {:invalid, :events, "must not be empty"}}

  def encode_events(events, metadata, store, holder) when is_list(events) do
    with {:ok, metas} <- event_metadata(events, metadata, store) do
      events
      |> Enum.zip(metas)
      |> Enum.reduce_while({[], [], 0}, fn {event, {meta, scope}}, {encoded, kept, bytes} ->
        case encode_event(event, store, holder) do
          {:ok, event, payload} ->
            type = event_type(event)
            size = bytes + byte_size(payload) + byte_size(type) + byte_size(meta)
            {:cont, {[{type, meta, payload, scope} | encoded], [event | kept], size}}

          error ->
            {:halt, error}
        end
      end)
      |> case do
        {encoded, kept, bytes} -> {:ok, %{encoded: Enum.reverse(encoded), bytes: bytes, events: Enum.reverse(kept)}}
        error -> error
      end
    end
  end

  def encode_events(_events, _metadata, _store, _holder), do: {:error, {:invalid, :events, "must be a list"}}

  # {encoded metadata, scope} for each event: one map for all, or one map per event.
  defp event_metadata(events, metadata, store) when is_list(metadata) do
    if length(metadata) == length(events) do
      Kuma.Validate.each(metadata, &one_metadata(&1, store))
    else
      {:error,
       {:invalid, :metadata, "a list must hold one map per event (#{length(events)} events, #{length(metadata)} maps)"}}
    end
  end

  defp event_metadata(events, metadata, store) do
    with {:ok, encoded} <- one_metadata(metadata, store), do: {:ok, List.duplicate(encoded, length(events))}
  end

  defp one_metadata(meta, store) do
    with {:ok, bytes} <- encode_metadata(meta, store),
         {:ok, scope} <- scope(meta),
         do: {:ok, {bytes, scope}}
  end

  # One event, encoded once; an event holding sensitive values is sealed (clear values kept
  # for the caller's state) and encoded again without them.
  defp encode_event(event, store, holder) do
    bytes = :erlang.term_to_binary(event)

    cond do
      not Kuma.Sensitive.in_binary?(bytes) ->
        {:ok, event, bytes}

      store == nil ->
        {:error, {:invalid, :sensitive, "sensitive values can only be written through a store"}}

      true ->
        with {:ok, sealed} <- Kuma.Sensitive.seal(store, event, holder),
             {:ok, stripped} <- Kuma.Sensitive.strip(store, sealed) do
          {:ok, sealed, :erlang.term_to_binary(stripped)}
        end
    end
  end

  @doc "The scope in append metadata (see \"Scope\"), or nil."
  @spec scope(map() | nil) :: {:ok, String.t() | nil} | {:error, term()}
  def scope(%{scope: scope}), do: check_scope(scope)
  def scope(%{"scope" => scope}), do: check_scope(scope)
  def scope(_metadata), do: {:ok, nil}

  @doc false
  # A scope (or scope prefix): a non-empty UTF-8 string.
  @spec check_scope(term()) :: {:ok, String.t()} | {:error, term()}
  def check_scope(scope) when is_binary(scope) and scope != "" do
    if String.valid?(scope), do: {:ok, scope}, else: {:error, {:invalid, :scope, "must be valid UTF-8"}}
  end

  def check_scope(_scope), do: {:error, {:invalid, :scope, "must be a non-empty string"}}

  @doc "Encodes append metadata: `nil` or `%{}` give an empty binary."
  @spec encode_metadata(map() | nil, Kuma.Store.t() | nil) :: {:ok, binary()} | {:error, term()}
  def encode_metadata(meta, store \\ nil)
  def encode_metadata(nil, _store), do: {:ok, <<>>}
  def encode_metadata(meta, _store) when is_map(meta) and map_size(meta) == 0, do: {:ok, <<>>}
  def encode_metadata(meta, store) when is_map(meta), do: encode_term(meta, store)
  def encode_metadata(_meta, _store), do: {:error, {:invalid, :metadata, "must be a map"}}

  @doc false
  # term_to_binary, with sensitive values sealed and stripped of their clear value.
  @spec encode_term(term(), Kuma.Store.t() | nil) :: {:ok, binary()} | {:error, term()}
  def encode_term(term, store) do
    bytes = :erlang.term_to_binary(term)

    cond do
      not Kuma.Sensitive.in_binary?(bytes) ->
        {:ok, bytes}

      store == nil ->
        {:error, {:invalid, :sensitive, "sensitive values can only be written through a store"}}

      true ->
        with {:ok, stripped} <- Kuma.Sensitive.strip(store, term), do: {:ok, :erlang.term_to_binary(stripped)}
    end
  end

  @doc "Decodes stored metadata."
  @spec decode_metadata(binary()) :: map()
  def decode_metadata(<<>>), do: %{}
  def decode_metadata(bytes), do: decode!(bytes, "", nil, nil, :trusted)

  @doc false
  # Builds an envelope from a stored event (`Kuma.Native`'s event record), decoding with
  # the store's :decode mode and running the store's upcasters on the data.
  @spec envelope(Kuma.Native.event(), Kuma.Store.t()) :: Kuma.Envelope.t()
  def envelope(
        Kuma.Native.event(
          entity_id: id,
          seq: seq,
          position: position,
          shard: shard,
          timestamp: ts,
          type: type,
          metadata: meta,
          payload: payload,
          hash: hash
        ),
        store
      ) do
    envelope = %Kuma.Envelope{
      entity_id: id,
      seq: seq,
      position: position,
      shard: shard,
      type: type,
      timestamp: ts,
      metadata: if(meta == <<>>, do: %{}, else: decode_stored(meta, "", id, seq, store, id)),
      data: decode_stored(payload, type, id, seq, store, id),
      hash: hash
    }

    case store.upcasters do
      [] -> envelope
      upcasters -> %{envelope | data: Enum.reduce(upcasters, envelope.data, &upcast(&1, &2, envelope))}
    end
  end

  @doc false
  # A stored term (event, metadata or snapshot) decoded with the store's :decode mode, its
  # sensitive values opened (or marked erased). `holder` is recorded as holding the revealed
  # values (Kuma.Sensitive.reveal/3); nil records nothing.
  @spec decode_stored(binary(), String.t(), binary(), non_neg_integer(), Kuma.Store.t(), binary() | nil) :: term()
  def decode_stored(bytes, type, entity_id, seq, store, holder) do
    term = decode!(bytes, type, entity_id, seq, store.decode)
    if Kuma.Sensitive.in_binary?(bytes), do: Kuma.Sensitive.reveal(store, term, holder), else: term
  end

  defp upcast(fun, data, envelope) when is_function(fun, 2), do: fun.(data, envelope)
  defp upcast(module, data, envelope), do: module.upcast(data, envelope)

  @doc """
  Decodes a stored term (see "Payload" above). `type` names a module to load if an atom is
  unknown; `entity_id` and `seq` only label the error.
  """
  @spec decode!(binary(), String.t(), binary() | nil, non_neg_integer() | nil, :trusted | :safe) :: term()
  def decode!(bytes, type, entity_id, seq, mode) do
    :erlang.binary_to_term(bytes, [:safe])
  rescue
    ArgumentError ->
      # The likely cause: an atom (a struct's module) this VM has not seen since restart.
      load_module(type)

      try do
        :erlang.binary_to_term(bytes, [:safe])
      rescue
        ArgumentError ->
          trusted_decode!(bytes, type, entity_id, seq, mode)
      end
  end

  # Loads the module a type names, if there is one, creating no atom for a name that is
  # neither known to the VM nor the name of a module on the code path (so that stored
  # types, whoever wrote them, cannot fill the atom table).
  defp load_module(""), do: :ok

  defp load_module(type) do
    name = "Elixir." <> type

    module =
      try do
        String.to_existing_atom(name)
      rescue
        ArgumentError ->
          if :code.where_is_file(String.to_charlist(name <> ".beam")) != :non_existing,
            do: String.to_atom(name)
      end

    if module, do: Code.ensure_loaded(module)
    :ok
  end

  defp trusted_decode!(bytes, type, entity_id, seq, :trusted) do
    :erlang.binary_to_term(bytes)
  rescue
    ArgumentError -> raise Kuma.DecodeError, entity_id: entity_id, seq: seq, type: type, reason: :malformed
  end

  defp trusted_decode!(_bytes, type, entity_id, seq, :safe) do
    raise Kuma.DecodeError, entity_id: entity_id, seq: seq, type: type, reason: :unknown_atom
  end
end
