-- Provisioning a Pi by claim code (docs/decisions/0016-provisioning-and-claim.md):
--   1. a dashboard user creates a short, single-use, short-lived claim code (create_claim_code);
--   2. the claim service (the `claim-agent` edge function on hosted Supabase, the harness's
--      stand-in locally; service_role, never on a Pi) exchanges it with claim_agent, atomically:
--      the edge_agents row for the code's user, the masters assigned to it, and the agent's own
--      Supabase Auth login bound to it;
--   3. Supabase Auth issues the agent's tokens; custom_access_token_hook adds agent_id and
--      owner_id to them, and refuses to issue any for a revoked agent;
--   4. PostgREST's pre-request hook (autocore_hooks.check_request) makes such a token speak as
--      the owner (sub = owner) for the request, so every policy written for sub = owner holds.
--   5. an agent adds a master later with adopt_master.
-- Runs unchanged on hosted Supabase and on the local stack.

-- ---------------------------------------------------------------------------
-- Tables (private: no API role reads them)
-- ---------------------------------------------------------------------------

-- Only the SHA-256 of a code is kept: a code is a bearer secret for 15 minutes.
create table private.claim_codes (
  code_hash bytea primary key,
  owner_id uuid not null references auth.users (id) on delete cascade,
  created_at timestamptz not null default now(),
  expires_at timestamptz not null,
  used_at timestamptz,
  agent_id text
);
create index claim_codes_owner_idx on private.claim_codes (owner_id);

-- Which Supabase Auth user is which agent. Private so that no dashboard user can bind their own
-- (or anybody's) login to an agent: only claim_agent writes it.
create table private.agent_logins (
  auth_user_id uuid primary key references auth.users (id) on delete cascade,
  agent_id text not null unique references public.edge_agents (agent_id) on delete cascade
);

-- ---------------------------------------------------------------------------
-- 1. create_claim_code
-- ---------------------------------------------------------------------------

-- Crockford's base32: no I, L, O or U, so a code read aloud or off a screen is typed right.
create or replace function private.normalise_claim_code(p_code text) returns text
language sql immutable
set search_path = ''
as $$
  select translate(upper(regexp_replace(coalesce(p_code, ''), '[\s-]', '', 'g')), 'OIL', '011')
$$;

create or replace function private.claim_code_hash(p_code text) returns bytea
language sql immutable
set search_path = ''
as $$
  select sha256(convert_to(private.normalise_claim_code(p_code), 'UTF8'))
$$;

create or replace function public.create_claim_code(p_valid_minutes integer default 15)
returns table (code text, expires_at timestamptz)
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_alphabet constant text := '0123456789ABCDEFGHJKMNPQRSTVWXYZ';
  v_bytes bytea;
  v_code text := '';
  v_positions constant integer[] := array[0, 1, 2, 3, 4, 5, 9, 10, 11, 12];
  v_pos integer;
  v_open integer;
begin
  if private.caller_kind() is distinct from 'user' then
    raise exception 'claim_code_refused: only a dashboard user creates claim codes'
      using errcode = 'insufficient_privilege';
  end if;
  if p_valid_minutes is null or p_valid_minutes not between 1 and 60 then
    raise exception 'p_valid_minutes must be between 1 and 60, got %', p_valid_minutes
      using errcode = 'invalid_parameter_value';
  end if;
  select count(*) into v_open from private.claim_codes c
   where c.owner_id = auth.uid() and c.used_at is null and c.expires_at > now();
  if v_open >= 5 then
    raise exception 'claim_code_limit: % claim codes are open; use one or let them expire', v_open
      using errcode = 'program_limit_exceeded';
  end if;
  -- gen_random_uuid() is a strong random source in core Postgres; these bytes of a v4 UUID carry
  -- no version or variant bits. 10 characters of 5 bits: 50 bits, for 15 minutes, behind a
  -- service-role endpoint.
  v_bytes := uuid_send(gen_random_uuid());
  foreach v_pos in array v_positions loop
    v_code := v_code || substr(v_alphabet, (get_byte(v_bytes, v_pos) & 31) + 1, 1);
  end loop;
  code := substr(v_code, 1, 5) || '-' || substr(v_code, 6, 5);
  expires_at := now() + make_interval(mins => p_valid_minutes);
  insert into private.claim_codes (code_hash, owner_id, expires_at)
  values (private.claim_code_hash(code), auth.uid(), expires_at);
  return next;
end
$$;

comment on function public.create_claim_code(integer) is
  'For a dashboard user: a single-use code (XXXXX-XXXXX) that provisions one Pi as this user''s edge agent; valid p_valid_minutes (default 15). Only its hash is stored.';

-- ---------------------------------------------------------------------------
-- 2. claim_agent (service_role only)
-- ---------------------------------------------------------------------------

-- Every refusal is raised before anything is written, and the whole call is one transaction: a
-- refused claim changes nothing, and leaves a good code usable. The code's row is locked first,
-- so two claims of one code serialise and the second sees it used.
create or replace function public.claim_agent(
  p_code text,
  p_agent_id text,
  p_agent_name text default null,
  p_masters text[] default '{}',
  p_auth_user_id uuid default null
)
returns table (agent_id text, owner_id uuid, masters text[])
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_code private.claim_codes%rowtype;
  v_master text;
  v_device record;
begin
  select * into v_code from private.claim_codes c
   where c.code_hash = private.claim_code_hash(p_code)
   for update;
  if not found then
    raise exception 'claim_code_unknown: no such claim code; check it, or create a new one in the dashboard'
      using errcode = 'invalid_authorization_specification';
  end if;
  if v_code.used_at is not null then
    raise exception 'claim_code_used: this claim code was already used (at %); create a new one in the dashboard',
      v_code.used_at
      using errcode = 'invalid_authorization_specification';
  end if;
  if v_code.expires_at <= now() then
    raise exception 'claim_code_expired: this claim code expired at %; create a new one in the dashboard',
      v_code.expires_at
      using errcode = 'invalid_authorization_specification';
  end if;
  if p_agent_id is null or p_agent_id !~ '^[A-Za-z0-9_.:-]{1,64}$' then
    raise exception 'claim_agent_id_invalid: the agent id must be 1-64 characters of A-Z a-z 0-9 _ . : -, got %', p_agent_id
      using errcode = 'invalid_parameter_value';
  end if;
  if exists (select 1 from public.edge_agents a where a.agent_id = p_agent_id) then
    raise exception 'claim_agent_exists: agent id % is taken; choose another', p_agent_id
      using errcode = 'unique_violation';
  end if;
  if coalesce(cardinality(p_masters), 0) > 32 then
    raise exception 'claim_masters_limit: at most 32 masters in one claim, got %', cardinality(p_masters)
      using errcode = 'program_limit_exceeded';
  end if;
  if p_auth_user_id is not null and exists (
       select 1 from private.agent_logins l where l.auth_user_id = p_auth_user_id) then
    raise exception 'claim_login_taken: auth user % already is an agent''s login', p_auth_user_id
      using errcode = 'unique_violation';
  end if;
  -- Masters: new ones are created for the code's user; one the user has that no live agent
  -- serves is assigned; anyone else's, or one another live agent serves, is refused (the same
  -- answer for both: whether an id is taken is all it says).
  foreach v_master in array coalesce(p_masters, '{}') loop
    if v_master is null or v_master !~ '^[A-Za-z0-9_.:-]{1,64}$' then
      raise exception 'claim_master_invalid: a master id must be 1-64 characters of A-Z a-z 0-9 _ . : -, got %', v_master
        using errcode = 'invalid_parameter_value';
    end if;
    select d.owner_id, d.agent_id, a.revoked_at into v_device
      from public.device_status d
      left join public.edge_agents a on a.agent_id = d.agent_id
     where d.device_id = v_master
     for update of d;
    if found and (v_device.owner_id <> v_code.owner_id
                  or (v_device.agent_id is not null and v_device.revoked_at is null)) then
      raise exception 'claim_master_taken: master % is another owner''s or served by a live agent; unassign it in the dashboard first',
        v_master
        using errcode = 'insufficient_privilege';
    end if;
  end loop;

  insert into public.edge_agents (agent_id, owner_id, name)
  values (p_agent_id, v_code.owner_id, coalesce(p_agent_name, p_agent_id));
  if p_auth_user_id is not null then
    insert into private.agent_logins (auth_user_id, agent_id) values (p_auth_user_id, p_agent_id);
  end if;
  insert into public.device_status (device_id, owner_id, agent_id, device_name)
  select distinct m, v_code.owner_id, p_agent_id, m from unnest(coalesce(p_masters, '{}')) m
  on conflict on constraint device_status_pkey do update
    set agent_id = excluded.agent_id, updated_at = now()
    where public.device_status.owner_id = excluded.owner_id;
  update private.claim_codes c set used_at = now(), agent_id = p_agent_id
   where c.code_hash = v_code.code_hash;

  agent_id := p_agent_id;
  owner_id := v_code.owner_id;
  masters := array(select distinct m from unnest(coalesce(p_masters, '{}')) m order by m);
  return next;
end
$$;

comment on function public.claim_agent(text, text, text, text[], uuid) is
  'For the claim service only (service_role): exchanges a claim code for an edge agent of the code''s user, its masters and its login. Refusals (SQLSTATE 28000 for the code) change nothing.';

-- ---------------------------------------------------------------------------
-- 3. The Custom Access Token Hook (Supabase Auth)
-- ---------------------------------------------------------------------------

-- Enable it in the project: Authentication > Hooks > Customize Access Token, function
-- public.custom_access_token_hook (config.toml: [auth.hook.custom_access_token]). For an
-- agent's login it adds agent_id and owner_id; every other user's token passes unchanged. A
-- revoked agent gets no token at all, so its refresh fails too.
create or replace function public.custom_access_token_hook(event jsonb) returns jsonb
language plpgsql stable security definer
set search_path = ''
as $$
declare
  v_agent_id text;
  v_owner uuid;
  v_revoked timestamptz;
begin
  select a.agent_id, a.owner_id, a.revoked_at into v_agent_id, v_owner, v_revoked
    from private.agent_logins l
    join public.edge_agents a on a.agent_id = l.agent_id
   where l.auth_user_id = (event ->> 'user_id')::uuid;
  if not found then
    return event;
  end if;
  if v_revoked is not null then
    return jsonb_build_object('error', jsonb_build_object(
      'http_code', 403,
      'message', format('edge agent %s was revoked by its owner; provision the Pi again with a new claim code', v_agent_id)));
  end if;
  return jsonb_set(event, '{claims}',
    coalesce(event -> 'claims', '{}'::jsonb)
      || jsonb_build_object('agent_id', v_agent_id, 'owner_id', v_owner));
end
$$;

comment on function public.custom_access_token_hook(jsonb) is
  'Supabase Auth''s Custom Access Token Hook: adds agent_id and owner_id to an edge agent''s tokens, refuses a revoked agent''s.';

-- ---------------------------------------------------------------------------
-- 4. The pre-request hook: an agent's login speaks as its owner
-- ---------------------------------------------------------------------------

-- A token Supabase Auth issued to an agent's login has sub = that login, not the owner. It must
-- keep it: GoTrue's own endpoints act on sub, so a token with sub = owner would let the Pi change
-- its owner's account. For the database, the request's claims are rewritten here (sub = owner,
-- agent_login = the login) when the login is bound to the agent its agent_id names; every
-- policy and RPC then sees the agent as before, and caller_kind() still checks it is live.
-- Anything that does not go through PostgREST (Realtime) sees the login, which is nobody.
-- Stable, as before: it writes no rows (set_config is a setting of this transaction), and a
-- volatile one costs a snapshot per statement on every request.
create or replace function autocore_hooks.check_request() returns void
language plpgsql stable security definer
set search_path = ''
as $$
declare
  v_claims jsonb := auth.jwt();
  v_owner uuid;
begin
  -- Only tokens the hook issued carry owner_id; minted agent tokens (sub = owner) skip the
  -- lookup. The claim only says where to look: the binding decides.
  if v_claims ->> 'agent_id' is not null and v_claims ? 'owner_id' and not v_claims ? 'agent_login'
     and v_claims ->> 'sub' ~ '^[0-9a-fA-F-]{36}$' then
    select a.owner_id into v_owner
      from private.agent_logins l
      join public.edge_agents a on a.agent_id = l.agent_id
     where l.auth_user_id = (v_claims ->> 'sub')::uuid
       and l.agent_id = v_claims ->> 'agent_id';
    if found then
      perform set_config('request.jwt.claims',
        (v_claims || jsonb_build_object('sub', v_owner, 'agent_login', v_claims ->> 'sub'))::text, true);
      -- Hosted auth.uid() reads the pre-PostgREST-10 setting first when it is set.
      if coalesce(current_setting('request.jwt.claim.sub', true), '') <> '' then
        perform set_config('request.jwt.claim.sub', v_owner::text, true);
      end if;
    end if;
  end if;
  if auth.jwt() ->> 'agent_id' is not null and private.caller_kind() is distinct from 'agent'
     and private.caller_kind() is distinct from 'service' then
    raise exception 'edge_agent_refused: agent % is revoked or not an agent of this owner', auth.jwt() ->> 'agent_id'
      using errcode = 'insufficient_privilege',
            hint = 'a revoked agent needs a new agent_id and token from its owner';
  end if;
end
$$;

-- ---------------------------------------------------------------------------
-- 5. adopt_master: `autocore-agent masters add`
-- ---------------------------------------------------------------------------

-- For an agent: serves master p_device_id from now on. A new id is created for the agent's
-- owner; one of the owner's that no live agent serves (discovered, or left by a revoked agent)
-- is assigned; anyone else's, or another live agent's, is refused. Returns {device_id, created}.
create or replace function public.adopt_master(p_device_id text)
returns table (device_id text, created boolean)
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_owner uuid := auth.uid();
  v_agent text := auth.jwt() ->> 'agent_id';
  v_device record;
begin
  if private.caller_kind() is distinct from 'agent' then
    raise exception 'adopt_master_refused: only a live edge agent adopts a master'
      using errcode = 'insufficient_privilege';
  end if;
  if p_device_id is null or p_device_id !~ '^[A-Za-z0-9_.:-]{1,64}$' then
    raise exception 'p_device_id must be 1-64 characters of A-Z a-z 0-9 _ . : -, got %', p_device_id
      using errcode = 'invalid_parameter_value';
  end if;
  select d.owner_id, d.agent_id, a.revoked_at into v_device
    from public.device_status d
    left join public.edge_agents a on a.agent_id = d.agent_id
   where d.device_id = p_device_id
   for update of d;
  if not found then
    insert into public.device_status (device_id, owner_id, agent_id, device_name)
    values (p_device_id, v_owner, v_agent, p_device_id);
    device_id := p_device_id;
    created := true;
    return next;
    return;
  end if;
  if v_device.owner_id <> v_owner
     or (v_device.agent_id is not null and v_device.agent_id <> v_agent and v_device.revoked_at is null) then
    -- 23505 (HTTP 409), not 42501 (403): the agent reads a 403 as its token refused.
    raise exception 'master_taken: master % is another owner''s or served by another live agent; unassign it in the dashboard first',
      p_device_id
      using errcode = 'unique_violation';
  end if;
  update public.device_status d set agent_id = v_agent, updated_at = now()
   where d.device_id = p_device_id;
  device_id := p_device_id;
  created := false;
  return next;
end
$$;

comment on function public.adopt_master(text) is
  'For an edge agent: serve master p_device_id (created for the owner if new; an unassigned one of the owner''s is taken). Returns {device_id, created}.';

-- ---------------------------------------------------------------------------
-- Grants
-- ---------------------------------------------------------------------------

revoke all on function private.normalise_claim_code(text) from public;
revoke all on function private.claim_code_hash(text) from public;
revoke all on function public.create_claim_code(integer) from public, anon;
grant execute on function public.create_claim_code(integer) to authenticated, service_role;
revoke all on function public.claim_agent(text, text, text, text[], uuid) from public, anon, authenticated;
grant execute on function public.claim_agent(text, text, text, text[], uuid) to service_role;
revoke all on function public.custom_access_token_hook(jsonb) from public, anon, authenticated;
revoke all on function public.adopt_master(text) from public, anon;
grant execute on function public.adopt_master(text) to authenticated, service_role;
revoke all on function autocore_hooks.check_request() from public;
grant execute on function autocore_hooks.check_request() to anon, authenticated, service_role;

-- Supabase Auth calls the hook as supabase_auth_admin (hosted only; not in the local stack).
do $$
begin
  if exists (select from pg_roles where rolname = 'supabase_auth_admin') then
    execute 'grant usage on schema public to supabase_auth_admin';
    execute 'grant execute on function public.custom_access_token_hook(jsonb) to supabase_auth_admin';
  end if;
end
$$;

notify pgrst, 'reload schema';
