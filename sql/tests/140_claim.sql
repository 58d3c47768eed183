-- Provisioning by claim code: create_claim_code, claim_agent (bad codes change nothing), the
-- Custom Access Token Hook, the pre-request rewrite of an agent login's token, adopt_master.
begin;
\ir fixtures/world.sql
select plan(44);

-- The agent's own Supabase Auth login, as the claim service creates it before claiming.
insert into auth.users (id, email) values
  ('c0000000-0000-0000-0000-000000000003', 'pi-new@agents.invalid'),
  ('c0000000-0000-0000-0000-000000000004', 'pi-other@agents.invalid');
insert into device_status (device_id, owner_id, agent_id) values
  ('ESP32_ALICE_U', 'a0000000-0000-0000-0000-000000000001', null);

create function tests.snapshot() returns text language sql as $$
  select concat_ws('|',
    (select count(*) from public.edge_agents),
    (select string_agg(device_id || '=' || coalesce(agent_id, '-'), ',' order by device_id) from public.device_status),
    (select count(*) from private.agent_logins),
    (select count(*) from private.claim_codes where used_at is not null)) $$;

-- ---------------------------------------------------------------------------
-- create_claim_code
-- ---------------------------------------------------------------------------
select tests.as_alice();
select set_config('tests.code', (select code from create_claim_code()), true);
select tests.as_superuser();
select matches(current_setting('tests.code'), '^[0-9A-HJKMNP-TV-Z]{5}-[0-9A-HJKMNP-TV-Z]{5}$',
  'a claim code is ten Crockford base32 characters in two groups');
select is((select count(*) from private.claim_codes where owner_id = 'a0000000-0000-0000-0000-000000000001'), 1::bigint,
  'the code is stored for its user');
select is((select count(*) from private.claim_codes where code_hash = sha256(convert_to(current_setting('tests.code'), 'UTF8'))),
  0::bigint, 'the code itself is not what is stored (the dash is not part of the hash)');
select is((select count(*) from private.claim_codes
            where code_hash = sha256(convert_to(replace(current_setting('tests.code'), '-', ''), 'UTF8'))),
  1::bigint, 'only the SHA-256 of the code is stored');
select ok((select expires_at between now() + interval '14 minutes' and now() + interval '16 minutes'
             from private.claim_codes where owner_id = 'a0000000-0000-0000-0000-000000000001'),
  'a code expires in 15 minutes by default');

select tests.as_anon();
select throws_ok('select create_claim_code()', '42501', null, 'anon cannot create a claim code');
select tests.as_agent('pi-alice');
select throws_ok('select create_claim_code()', '42501',
  'claim_code_refused: only a dashboard user creates claim codes', 'an agent cannot create a claim code');
select tests.as_alice();
select throws_ok('select create_claim_code(0)', '22023', null, 'a validity under a minute is refused');
select throws_ok('select create_claim_code(61)', '22023', null, 'a validity over an hour is refused');
select lives_ok('select create_claim_code() from generate_series(1, 4)', 'five codes may be open at once');
select throws_like('select create_claim_code()', 'claim_code_limit:%', 'a sixth open code is refused');
select throws_ok($$select claim_agent('X', 'pi-x')$$, '42501', null, 'a dashboard user cannot call claim_agent');
select tests.as_agent('pi-alice');
select throws_ok($$select claim_agent('X', 'pi-x')$$, '42501', null, 'an agent cannot call claim_agent');

-- ---------------------------------------------------------------------------
-- claim_agent: refusals change nothing
-- ---------------------------------------------------------------------------
select tests.as_superuser();
delete from private.claim_codes where code_hash <> private.claim_code_hash(current_setting('tests.code'));
select set_config('tests.before', tests.snapshot(), true);

select throws_ok($$select claim_agent('ZZZZZ-ZZZZZ', 'pi-new')$$, '28000',
  'claim_code_unknown: no such claim code; check it, or create a new one in the dashboard',
  'an unknown code is refused');
select throws_ok(format($$select claim_agent(%L, 'pi-new', null, '{ESP32_BOB_1}')$$, current_setting('tests.code')),
  '42501', null, 'a code naming another owner''s master is refused');
select throws_like(format($$select claim_agent(%L, 'pi-new', null, '{ESP32_BOB_1}')$$, current_setting('tests.code')),
  'claim_master_taken: master ESP32_BOB_1 %', 'and says which master');
select throws_like(format($$select claim_agent(%L, 'pi-new', null, '{ESP32_ALICE_2}')$$, current_setting('tests.code')),
  'claim_master_taken:%', 'a master another live agent serves is refused');
select throws_ok(format($$select claim_agent(%L, 'pi-bob')$$, current_setting('tests.code')),
  '23505', 'claim_agent_exists: agent id pi-bob is taken; choose another', 'an agent id already taken is refused');
select throws_ok(format($$select claim_agent(%L, 'pi new!')$$, current_setting('tests.code')),
  '22023', null, 'a malformed agent id is refused');
select is(tests.snapshot(), current_setting('tests.before'), 'the refused claims changed nothing');

-- An expired code.
select tests.as_alice();
select set_config('tests.expired', (select code from create_claim_code(1)), true);
select tests.as_superuser();
update private.claim_codes set expires_at = now() - interval '1 second'
 where code_hash = private.claim_code_hash(current_setting('tests.expired'));
select set_config('tests.before', tests.snapshot(), true);
select throws_like(format($$select claim_agent(%L, 'pi-new')$$, current_setting('tests.expired')),
  'claim_code_expired: this claim code expired at %', 'an expired code is refused');
select is(tests.snapshot(), current_setting('tests.before'), 'the expired code changed nothing');

-- ---------------------------------------------------------------------------
-- claim_agent: the exchange
-- ---------------------------------------------------------------------------
select results_eq(
  format($$select agent_id, owner_id, masters from claim_agent(lower(replace(%L, '-', ' ')), 'pi-new', 'new pi',
            '{ESP32_NEW_1,ESP32_ALICE_U,ESP32_ALICE_R,ESP32_NEW_1}', 'c0000000-0000-0000-0000-000000000003')$$,
         current_setting('tests.code')),
  $$values ('pi-new'::text, 'a0000000-0000-0000-0000-000000000001'::uuid, '{ESP32_ALICE_R,ESP32_ALICE_U,ESP32_NEW_1}'::text[])$$,
  'a good code (typed in lower case, with a space; a master named twice) makes an agent of the code''s user');
select results_eq($$select owner_id, name, revoked_at from edge_agents where agent_id = 'pi-new'$$,
  $$values ('a0000000-0000-0000-0000-000000000001'::uuid, 'new pi'::text, null::timestamptz)$$,
  'the edge_agents row belongs to the code''s user');
select results_eq($$select device_id, owner_id, agent_id from device_status where agent_id = 'pi-new' order by device_id$$,
  $$values ('ESP32_ALICE_R'::text, 'a0000000-0000-0000-0000-000000000001'::uuid, 'pi-new'::text),
           ('ESP32_ALICE_U', 'a0000000-0000-0000-0000-000000000001', 'pi-new'),
           ('ESP32_NEW_1', 'a0000000-0000-0000-0000-000000000001', 'pi-new')$$,
  'a new master is created, an unassigned one and a revoked agent''s are taken over');
select is((select agent_id from private.agent_logins where auth_user_id = 'c0000000-0000-0000-0000-000000000003'),
  'pi-new', 'the agent''s login is bound to it');

select set_config('tests.before', tests.snapshot(), true);
select throws_like(format($$select claim_agent(%L, 'pi-again')$$, current_setting('tests.code')),
  'claim_code_used: this claim code was already used %', 'a code used twice is refused');
select is(tests.snapshot(), current_setting('tests.before'), 'the second use changed nothing');

-- ---------------------------------------------------------------------------
-- The Custom Access Token Hook
-- ---------------------------------------------------------------------------
select is(custom_access_token_hook('{"user_id":"c0000000-0000-0000-0000-000000000003","claims":{"sub":"c0000000-0000-0000-0000-000000000003","role":"authenticated"},"authentication_method":"token_refresh"}') -> 'claims',
  '{"sub":"c0000000-0000-0000-0000-000000000003","role":"authenticated","agent_id":"pi-new","owner_id":"a0000000-0000-0000-0000-000000000001"}'::jsonb,
  'the hook adds agent_id and owner_id to an agent login''s token');
select is(custom_access_token_hook('{"user_id":"a0000000-0000-0000-0000-000000000001","claims":{"sub":"a0000000-0000-0000-0000-000000000001","role":"authenticated"}}'),
  '{"user_id":"a0000000-0000-0000-0000-000000000001","claims":{"sub":"a0000000-0000-0000-0000-000000000001","role":"authenticated"}}'::jsonb,
  'a dashboard user''s token passes unchanged');
select tests.as_alice();
select throws_ok($$select custom_access_token_hook('{}')$$, '42501', null, 'API callers cannot run the hook');
select tests.as_superuser();

-- ---------------------------------------------------------------------------
-- The pre-request hook: the agent login's token speaks as the owner
-- ---------------------------------------------------------------------------
select tests.act_as('authenticated', '{"role":"authenticated","sub":"c0000000-0000-0000-0000-000000000003","agent_id":"pi-new","owner_id":"a0000000-0000-0000-0000-000000000001"}');
select is(private.caller_kind(), null, 'before the pre-request hook, the agent''s login is nobody');
select lives_ok('select autocore_hooks.check_request()', 'the pre-request hook admits the agent''s login');
select is(auth.uid(), 'a0000000-0000-0000-0000-000000000001'::uuid, 'and the request speaks as the owner');
select is(private.caller_kind(), 'agent', 'as the agent');
select results_eq($$select device_id from device_status order by device_id$$,
  $$values ('ESP32_ALICE_R'::text), ('ESP32_ALICE_U'), ('ESP32_NEW_1')$$,
  'which sees exactly its masters');

-- Another login claiming pi-new (not bound to it) is refused.
select tests.act_as('authenticated', '{"role":"authenticated","sub":"c0000000-0000-0000-0000-000000000004","agent_id":"pi-new","owner_id":"a0000000-0000-0000-0000-000000000001"}');
select throws_ok('select autocore_hooks.check_request()', '42501', null,
  'a login not bound to the agent its token names is refused');

-- ---------------------------------------------------------------------------
-- adopt_master (autocore-agent masters add)
-- ---------------------------------------------------------------------------
select tests.as_agent('pi-new');
select results_eq($$select device_id, created from adopt_master('ESP32_NEW_2')$$,
  $$values ('ESP32_NEW_2'::text, true)$$, 'an agent adopts a new master');
select throws_like($$select adopt_master('ESP32_BOB_1')$$, 'master_taken:%', 'but not another owner''s');
select throws_like($$select adopt_master('ESP32_ALICE_1')$$, 'master_taken:%', 'nor another live agent''s');
select tests.as_alice();
select throws_ok($$select adopt_master('ESP32_NEW_3')$$, '42501', null, 'a dashboard user does not adopt for an agent');
select tests.as_superuser();
select is((select agent_id from device_status where device_id = 'ESP32_NEW_2'), 'pi-new', 'the adopted master is the agent''s');

-- ---------------------------------------------------------------------------
-- Revocation
-- ---------------------------------------------------------------------------
update edge_agents set revoked_at = now() where agent_id = 'pi-new';
select is(custom_access_token_hook('{"user_id":"c0000000-0000-0000-0000-000000000003","claims":{}}') #>> '{error,http_code}',
  '403', 'a revoked agent gets no new token');
select tests.act_as('authenticated', '{"role":"authenticated","sub":"c0000000-0000-0000-0000-000000000003","agent_id":"pi-new","owner_id":"a0000000-0000-0000-0000-000000000001"}');
select throws_like('select autocore_hooks.check_request()', 'edge_agent_refused:%',
  'a revoked agent''s unexpired token is refused before its request');

select * from finish();
rollback;
