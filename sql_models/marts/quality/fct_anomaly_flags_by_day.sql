-- Anomaly flags per customer, meter, rule and UTC day: value, threshold crossed and severity (rules in seeds/anomaly_rules.csv); a condition that lasts is raised once.
/* config
materialized: table
partitioned_by: billing_daily
time_column: day
grain: [day, customer_id, meter_id, rule]
lookback_days: 35
range_query: true
*/
-- range_query: every day d of [$start_date, $end_date) is computed in one query, each from its own
-- lookback [d - lookback_days, d] only, so a range gives every day the rows a run of that day alone
-- gives (a range run plans the query once instead of once per day)
with days as (
    select
        range::date as check_day,
        (range::date - ($start_date::date - $lookback_start_date::date)::integer)::date as lookback_start,
        epoch_ms(range::date::timestamp) as start_ms,
        epoch_ms((range::date + 1)::timestamp) as end_ms
    from range($start_date::date, $end_date::date, interval 1 day)
),

all_daily as (
    select * from fct_usage_by_day
    where day >= $lookback_start_date::date and day < $end_date::date
),

-- each day's lookback rows, keyed by the day they are read for (check_day)
daily as (
    select
        days.check_day,
        all_daily.*
    from days
    inner join all_daily
        on days.lookback_start <= all_daily.day and days.check_day >= all_daily.day
),

-- the lookback too: a scrape gap or an unmatched series is raised on the first day of a run of days
edges as (
    select * from int_series_edges_by_day
    where day >= $lookback_start_date::date and day < $end_date::date
),

series as (
    select * from dim_series
),

rules as (
    select * from stg_seeds__anomaly_rules
),

meters as (
    select * from stg_seeds__meters
),

subscriptions as (
    select * from stg_seeds__subscriptions
),

plans as (
    select * from stg_seeds__plans
),

prices as (
    select * from stg_seeds__prices
),

units as (
    select * from stg_seeds__units
),

-- quantities in messages are in the meter's billing unit (GiB, not bytes), rounded as invoice lines are
meter_units as (
    select
        meters.meter_id,
        meters.billing_unit,
        units.divisor
    from meters
    inner join units
        on meters.unit = units.unit and meters.billing_unit = units.billing_unit
),

today as (
    select * from all_daily
    where day >= $start_date::date
),

-- a meter's own rule rows win over the rows for every meter ('')
meter_rules as (
    select
        meters.meter_id,
        rules.*
    from meters
    cross join rules
    where rules.rule_meter_id = meters.meter_id
        or (
            rules.rule_meter_id = ''
            and not exists (
                select 1 from rules as own
                where own.rule = rules.rule and own.rule_meter_id = meters.meter_id
            )
        )
),

pool_shares as (
    select * from stg_external__pool_shares
    where day >= $start_date::date and day < $end_date::date
),

-- seed 000 rate limiting: the raw samples of the day, only for series of meters with a rate rule
rate_series as (
    select
        series.series_id,
        series.customer_id,
        series.meter_id
    from series
    where series.customer_id is not null
        and series.meter_id in (
            select meter_rules.meter_id from meter_rules
            where meter_rules.rule = 'rate_per_minute'
        )
),

rate_samples as (
    select
        series_id,
        ts_ms,
        value,
        epoch_ms(ts_ms)::date as check_day
    from stg_raw__samples
    where ts_ms >= $start_ms and ts_ms < $end_ms
        and isfinite(value)
        and series_id in (select rate_series.series_id from rate_series)
),

rates as (
    select
        check_day,
        series_id,
        max(
            case when prev_ts_ms is not null and ts_ms > prev_ts_ms and ts_ms - prev_ts_ms <= $staleness_ms
                    then counter_increase(value, prev_value) * 60000 / (ts_ms - prev_ts_ms)
            end
        ) as max_per_minute
    from (
        select
            check_day,
            series_id,
            ts_ms,
            value,
            lag(value) over by_time as prev_value,
            lag(ts_ms) over by_time as prev_ts_ms
        from rate_samples
        window by_time as (partition by series_id, check_day order by ts_ms)
    ) as ordered_samples
    group by check_day, series_id
),

-- seed 000: usage of the last 7 days against the 7 before
week_over_week as (
    select
        check_day,
        customer_id,
        meter_id,
        'week_over_week' as rule,
        sum(usage) filter (where day > check_day - interval 7 day) as this_week,
        sum(usage) filter (
            where day <= check_day - interval 7 day and day > check_day - interval 14 day
        ) as last_week,
        sum(usage) filter (
            where day > check_day - interval 8 day and day < check_day
        ) as this_week_before,
        sum(usage) filter (
            where day <= check_day - interval 8 day and day > check_day - interval 15 day
        ) as last_week_before
    from daily
    where kind = 'counter'
    group by check_day, customer_id, meter_id
),

-- a robust outlier against the customer's own previous 30 days: |x - median| / (1.4826 x MAD), per
-- dimension of a meter (an LLM model, priced on its own line): a day is one row of the dimension, and
-- a spike of one model is not lost among, nor a quiet model's day measured against, the others
baseline as (
    select
        check_day,
        customer_id,
        meter_id,
        dimension,
        median(usage) as median_usage,
        count(*) as baseline_days
    from daily
    where kind = 'counter' and day < check_day and day >= check_day - interval 30 day
    group by check_day, customer_id, meter_id, dimension
),

deviation as (
    select
        baseline.check_day,
        baseline.customer_id,
        baseline.meter_id,
        baseline.dimension,
        median(abs(daily.usage - baseline.median_usage)) as mad
    from daily
    inner join baseline
        on daily.check_day = baseline.check_day
        and daily.customer_id = baseline.customer_id and daily.meter_id = baseline.meter_id
        and daily.dimension = baseline.dimension
    where daily.kind = 'counter' and daily.day < daily.check_day and daily.day >= daily.check_day - interval 30 day
    group by baseline.check_day, baseline.customer_id, baseline.meter_id, baseline.dimension
),

-- seed 001: month-to-date usage against the included allowance of the plan in force that day, today
-- and yesterday (a level is raised on the day it is crossed); a peak allowance (devices, storage:
-- aggregation max) against the month-to-date peak
check_days as (
    select
        check_day,
        check_day as on_day
    from days
    union all
    select
        check_day,
        (check_day - interval 1 day)::date
    from days
    where check_day - interval 1 day >= date_trunc('month', check_day)
),

plan_on_day as (
    select
        check_days.check_day,
        check_days.on_day,
        subscriptions.customer_id,
        plans.plan_id,
        plans.plan_version
    from check_days
    inner join subscriptions
        on check_days.on_day >= subscriptions.start_date
        and coalesce(subscriptions.end_date, check_days.on_day + interval 1 day) > check_days.on_day
    inner join plans
        on subscriptions.plan_id = plans.plan_id
        and plans.effective_from <= greatest(subscriptions.start_date, date_trunc('month', check_days.check_day))
    qualify row_number() over (
            partition by check_days.check_day, check_days.on_day, subscriptions.customer_id
            order by plans.effective_from desc, plans.plan_version desc
        ) = 1
),

plan_today as (
    select
        check_day,
        customer_id,
        plan_id,
        plan_version
    from plan_on_day
    where on_day = check_day
),

allowances as (
    select
        plan_on_day.check_day,
        plan_on_day.on_day,
        plan_on_day.customer_id,
        prices.meter_id,
        prices.included_quantity,
        prices.included_quantity * meter_units.divisor as included_base,
        meters.aggregation
    from plan_on_day
    inner join prices
        on plan_on_day.plan_id = prices.plan_id and plan_on_day.plan_version = prices.plan_version
    inner join meters
        on prices.meter_id = meters.meter_id
    inner join meter_units
        on prices.meter_id = meter_units.meter_id
    where prices.included_quantity > 0 and prices.dimension = '' and meters.aggregation in ('sum', 'max')
),

month_to_date as (
    select
        check_days.check_day,
        check_days.on_day,
        daily.customer_id,
        daily.meter_id,
        -- a counter's usage adds up; a gauge's (its usage is null) month-to-date peak is its highest day
        coalesce(sum(daily.usage), max(daily.gauge_peak)) as usage
    from check_days
    inner join daily
        on check_days.check_day = daily.check_day
        and date_trunc('month', check_days.check_day) <= daily.day and check_days.on_day >= daily.day
    group by check_days.check_day, check_days.on_day, daily.customer_id, daily.meter_id
),

-- usage in a dimension (e.g. an LLM model) of a meter the plan in force prices per dimension, that no
-- price row covers: it is not billed, never priced at zero silently
unpriced as (
    select
        today.day as check_day,
        today.customer_id,
        today.meter_id,
        count(*) as dimensions,
        sum(coalesce(today.usage, today.gauge_peak)) as quantity,
        string_agg(
            coalesce(nullif(today.dimension, ''), '(none)') || ' ('
            || fmt_decimal(to_billing_units(coalesce(today.usage, today.gauge_peak), meter_units.divisor))
            || ' ' || meter_units.billing_unit || ')',
            ', ' order by today.dimension
        ) as detail
    from today
    inner join plan_today
        on today.day = plan_today.check_day and today.customer_id = plan_today.customer_id
    inner join meter_units
        on today.meter_id = meter_units.meter_id
    where exists (
            select 1 from prices
            where prices.plan_id = plan_today.plan_id and prices.plan_version = plan_today.plan_version
                and prices.meter_id = today.meter_id
        )
        and not exists (
            select 1 from prices
            where prices.plan_id = plan_today.plan_id and prices.plan_version = plan_today.plan_version
                and prices.meter_id = today.meter_id and (prices.dimension = '' or prices.dimension = today.dimension)
        )
    group by today.day, today.customer_id, today.meter_id
),

-- usage on a day no subscription of the customer covers (before it starts, after it ends, or none
-- at all) is on no invoice; it would change money when a plan prices the meter: one of the
-- customer's plans, or any plan for a customer with no subscription
uncovered as (
    select
        today.day as check_day,
        today.customer_id,
        today.meter_id,
        sum(coalesce(today.usage, today.gauge_peak)) as quantity
    from today
    where coalesce(today.usage, today.gauge_peak) > 0
        and not exists (
            select 1 from subscriptions
            where subscriptions.customer_id = today.customer_id
                and subscriptions.start_date <= today.day
                and coalesce(subscriptions.end_date, (today.day + 1)::date) > today.day
        )
    group by today.day, today.customer_id, today.meter_id
),

uncovered_context as (
    select
        uncovered.check_day,
        uncovered.customer_id,
        uncovered.meter_id,
        uncovered.quantity,
        exists (
            select 1 from prices
            inner join subscriptions
                on prices.plan_id = subscriptions.plan_id
            where prices.meter_id = uncovered.meter_id and subscriptions.customer_id = uncovered.customer_id
        ) or (
            exists (
                select 1 from prices
                where prices.meter_id = uncovered.meter_id
            )
            and not exists (
                select 1 from subscriptions
                where subscriptions.customer_id = uncovered.customer_id
            )
        ) as priced,
        (
            select arg_max(subscriptions.plan_id || ' ended ' || subscriptions.end_date, subscriptions.end_date)
            from subscriptions
            where subscriptions.customer_id = uncovered.customer_id and subscriptions.end_date <= uncovered.check_day
        ) as ended,
        (
            select arg_min(subscriptions.plan_id || ' starting ' || subscriptions.start_date, subscriptions.start_date)
            from subscriptions
            where subscriptions.customer_id = uncovered.customer_id and subscriptions.start_date > uncovered.check_day
        ) as starting
    from uncovered
),

unmatched_by_day as (
    select
        edges.day,
        series.meter_id,
        count(distinct series.series_id) as unmatched_series,
        string_agg(
            distinct series.customer_label || '=' || coalesce(series.customer_label_value, '(missing)'), ', '
            order by series.customer_label || '=' || coalesce(series.customer_label_value, '(missing)')
        ) as labels
    from edges
    inner join series
        on edges.series_id = series.series_id
    where series.meter_id is not null and series.customer_id is null
        and edges.day >= $start_date::date - interval 1 day
    group by edges.day, series.meter_id
),

unmatched as (
    select * from unmatched_by_day
    where day >= $start_date::date
),

-- per series and day of the lookback: the longest gap between two samples, with the one before the
-- day's first sample from the series' last sample on an earlier day (across midnight, or whole days
-- without samples)
-- (the sample before is one of the checked day's lookback only: a day reads no earlier day)
series_samples_by_day as (
    select
        day,
        series_id,
        max_gap_ms,
        first_ts_ms,
        lag(day) over by_day as previous_day,
        lag(last_ts_ms) over by_day as previous_last_ts_ms
    from edges
    where samples > 0
    window by_day as (partition by series_id order by day)
),

series_gaps_by_day as (
    select
        days.check_day,
        series_samples_by_day.day,
        series_samples_by_day.series_id,
        greatest(
            series_samples_by_day.max_gap_ms,
            coalesce(
                case
                    when series_samples_by_day.previous_day >= days.lookback_start
                        then series_samples_by_day.first_ts_ms - series_samples_by_day.previous_last_ts_ms
                end,
                0
            )
        ) as max_gap_ms
    from days
    inner join series_samples_by_day
        on days.lookback_start <= series_samples_by_day.day and days.check_day >= series_samples_by_day.day
),

-- the longest gap between two samples of a customer's series of a meter, per day of the lookback
gaps_by_day as (
    select
        series_gaps_by_day.check_day,
        series_gaps_by_day.day,
        series.customer_id,
        series.meter_id,
        max(series_gaps_by_day.max_gap_ms) as max_gap_ms
    from series_gaps_by_day
    inner join series
        on series_gaps_by_day.series_id = series.series_id
    where series.customer_id is not null
    group by series_gaps_by_day.check_day, series_gaps_by_day.day, series.customer_id, series.meter_id
),

gaps as (
    select * from gaps_by_day
    where day = check_day
),

-- runs of consecutive days with a gap over the rule's (lowest) threshold: the first day of the run
-- that reaches today (a day with no samples at all ends a run)
gap_days as (
    select
        gaps_by_day.check_day,
        gaps_by_day.day,
        gaps_by_day.customer_id,
        gaps_by_day.meter_id
    from gaps_by_day
    inner join meter_rules
        on gaps_by_day.meter_id = meter_rules.meter_id and meter_rules.rule = 'scrape_gap'
    group by gaps_by_day.check_day, gaps_by_day.day, gaps_by_day.customer_id, gaps_by_day.meter_id
    having max(gaps_by_day.max_gap_ms) > min(meter_rules.threshold)
),

gap_runs as (
    select
        check_day,
        customer_id,
        meter_id,
        min(day) as run_start,
        count(*) as run_days
    from (
        select
            *,
            day - (row_number() over (partition by check_day, customer_id, meter_id order by day))::integer as island
        from gap_days
    ) as islands
    group by check_day, customer_id, meter_id, island
    having max(day) = check_day
),

-- one union branch per rule: the column names are the first branch's, each branch reads its own
-- CTEs (unqualified where one table is read)
-- noqa: disable=AL03,RF02
-- quantity: in base units, the one the message states (shown in billing units)
candidates as (
    select
        week_over_week.check_day,
        '' as dimension,
        week_over_week.customer_id,
        week_over_week.meter_id,
        rule,
        (this_week / last_week)::decimal(38, 9) as value,
        'usage ' || fmt_decimal(to_billing_units(this_week, divisor)) || ' ' || billing_unit || ' in the last 7 days vs '
        || fmt_decimal(to_billing_units(last_week, divisor)) || ' ' || billing_unit || ' the 7 before' as detail,
        this_week as quantity
    from week_over_week
    inner join meter_units on week_over_week.meter_id = meter_units.meter_id
    where last_week > 0
    union all
    select
        today.day,
        today.dimension,
        today.customer_id,
        today.meter_id,
        'outlier_mad',
        (abs(today.usage - baseline.median_usage) / (1.4826 * deviation.mad))::decimal(38, 9),
        coalesce(nullif(today.dimension, '') || ': ', '')
        || 'usage ' || fmt_decimal(to_billing_units(today.usage, divisor)) || ' ' || billing_unit || ' vs 30-day median '
        || fmt_decimal(to_billing_units(baseline.median_usage, divisor)) || ' ' || billing_unit
        || ' (MAD ' || fmt_decimal(to_billing_units(deviation.mad, divisor)) || ' ' || billing_unit || ', '
        || baseline.baseline_days || ' days)',
        today.usage
    from today
    inner join baseline
        on today.day = baseline.check_day and today.customer_id = baseline.customer_id and today.meter_id = baseline.meter_id
        and today.dimension = baseline.dimension
    inner join deviation
        on today.day = deviation.check_day and today.customer_id = deviation.customer_id and today.meter_id = deviation.meter_id
        and today.dimension = deviation.dimension
    inner join meter_units on today.meter_id = meter_units.meter_id
    where today.kind = 'counter' and baseline.baseline_days >= 7 and deviation.mad > 0
    union all
    select
        allowances.check_day,
        '',
        allowances.customer_id,
        allowances.meter_id,
        'allowance_used',
        (month_to_date.usage * 100 / allowances.included_base)::decimal(38, 9),
        case when allowances.aggregation = 'max' then 'peak ' else '' end
        || fmt_decimal(to_billing_units(month_to_date.usage, meter_units.divisor)) || ' ' || meter_units.billing_unit
        || case when allowances.aggregation = 'max' then ' this month of ' else ' used this month of ' end
        || fmt_decimal(allowances.included_quantity) || ' ' || meter_units.billing_unit
        || ' included',
        month_to_date.usage
    from allowances
    inner join month_to_date
        on allowances.check_day = month_to_date.check_day
        and allowances.on_day = month_to_date.on_day
        and allowances.customer_id = month_to_date.customer_id
        and allowances.meter_id = month_to_date.meter_id
    inner join meter_units on allowances.meter_id = meter_units.meter_id
    where allowances.on_day = allowances.check_day
    union all
    select
        gaps.check_day,
        '',
        gaps.customer_id,
        gaps.meter_id,
        'scrape_gap',
        gaps.max_gap_ms::decimal(38, 9),
        'longest gap between two samples: ' || (gaps.max_gap_ms // 60000) || ' min'
        || case
            when gap_runs.run_start < gaps.check_day
                then '; gaps every day since ' || gap_runs.run_start || ' (' || gap_runs.run_days || ' days)'
            else ''
        end,
        null
    from gaps
    left join gap_runs
        on gaps.check_day = gap_runs.check_day
        and gaps.customer_id = gap_runs.customer_id and gaps.meter_id = gap_runs.meter_id
    union all
    select
        day,
        dimension,
        customer_id,
        meter_id,
        'counter_resets',
        resets::decimal(38, 9),
        resets || ' counter resets',
        null
    from today
    where kind = 'counter'
    union all
    select
        day,
        dimension,
        customer_id,
        meter_id,
        'reappeared_series',
        reappeared_series::decimal(38, 9),
        reappeared_series || ' series back after more than 35 days; their first value was not billed',
        null
    from today
    union all
    select
        day,
        dimension,
        customer_id,
        meter_id,
        'dropped_samples',
        dropped_samples::decimal(38, 9),
        dropped_samples || ' NaN or staleness samples dropped',
        null
    from today
    union all
    select
        day,
        dimension,
        customer_id,
        meter_id,
        'duplicate_conflicts',
        duplicate_conflicts::decimal(38, 9),
        duplicate_conflicts || ' timestamps of a series with different values (the larger was billed)',
        null
    from today
    union all
    -- a level meter's day is billed from the time some level holds: report the rest as uncovered
    select
        today.day,
        today.dimension,
        today.customer_id,
        today.meter_id,
        'low_coverage',
        from_nano(div_half_up(((days.end_ms - days.start_ms) - today.gauge_held_ms)::hugeint * 100000000000, days.end_ms - days.start_ms)),
        'a level held ' || (today.gauge_held_ms // 60000) || ' of ' || ((days.end_ms - days.start_ms) // 60000) || ' min',
        null
    from today
    inner join days on today.day = days.check_day
    where today.kind = 'gauge'
    union all
    select
        rates.check_day,
        '',
        rate_series.customer_id,
        rate_series.meter_id,
        'rate_per_minute',
        max(rates.max_per_minute)::decimal(38, 9),
        'highest rate between two scrapes: ' || round(max(rates.max_per_minute), 1) || ' per minute',
        null
    from rates
    inner join rate_series on rates.series_id = rate_series.series_id
    where rates.max_per_minute is not null
    group by rates.check_day, rate_series.customer_id, rate_series.meter_id
    union all
    select
        today.day,
        today.dimension,
        today.customer_id,
        today.meter_id,
        'pool_share_mismatch',
        (abs(today.usage - pool_shares.pool_accepted_shares) * 100 / pool_shares.pool_accepted_shares)::decimal(38, 9),
        'proxy counted ' || fmt_decimal(to_billing_units(today.usage, divisor)) || ' ' || billing_unit
        || ', the pool reported ' || fmt_decimal(to_billing_units(pool_shares.pool_accepted_shares, divisor)) || ' ' || billing_unit,
        today.usage
    from today
    inner join pool_shares on today.day = pool_shares.day and today.customer_id = pool_shares.customer_id
    inner join meter_units on today.meter_id = meter_units.meter_id
    where today.kind = 'counter' and pool_shares.pool_accepted_shares > 0
    union all
    select
        check_day,
        '',
        customer_id,
        meter_id,
        'unpriced_usage',
        dimensions::decimal(38, 9),
        'usage no price row of the plan covers (not billed): ' || detail,
        quantity
    from unpriced
    union all
    select
        check_day,
        '',
        customer_id,
        meter_id,
        case when priced then 'outside_subscription' else 'outside_subscription_unpriced' end,
        quantity::decimal(38, 9),
        fmt_decimal(to_billing_units(quantity, divisor)) || ' ' || billing_unit || ' used '
        || case
            when ended is not null and starting is not null
                then 'between the subscription to ' || ended || ' and the one to ' || starting
            when ended is not null then 'after the subscription to ' || ended
            when starting is not null then 'before the subscription to ' || starting
            else 'with no subscription'
        end
        || ': on no invoice',
        quantity
    from uncovered_context
    inner join meter_units using (meter_id)
    union all
    select
        day,
        '',
        '' as customer_id,
        meter_id,
        'unmatched_series',
        unmatched_series::decimal(38, 9),
        unmatched_series || ' series billed to nobody: ' || labels,
        null
    from unmatched
),
-- noqa: enable=AL03,RF02

-- the same rules for yesterday, for the conditions that last: a flag is raised on the day its
-- condition starts (or reaches a higher level), not on every day it still holds
candidates_yesterday as (
    select
        check_day,
        customer_id,
        meter_id,
        rule,
        (this_week_before / last_week_before)::decimal(38, 9) as value
    from week_over_week
    where last_week_before > 0
    union all
    select
        allowances.check_day,
        allowances.customer_id,
        allowances.meter_id,
        'allowance_used' as rule,
        (month_to_date.usage * 100 / allowances.included_base)::decimal(38, 9) as value
    from allowances
    inner join month_to_date
        on allowances.check_day = month_to_date.check_day
        and allowances.on_day = month_to_date.on_day
        and allowances.customer_id = month_to_date.customer_id
        and allowances.meter_id = month_to_date.meter_id
    where allowances.on_day < allowances.check_day
    union all
    select
        check_day,
        customer_id,
        meter_id,
        'scrape_gap' as rule,
        max_gap_ms::decimal(38, 9) as value
    from gaps_by_day
    where day = check_day - interval 1 day
    union all
    select
        days.check_day,
        '' as customer_id,
        unmatched_by_day.meter_id,
        'unmatched_series' as rule,
        unmatched_by_day.unmatched_series::decimal(38, 9) as value
    from unmatched_by_day
    inner join days on unmatched_by_day.day = days.check_day - interval 1 day
),

-- every level (threshold row) a value crosses, today and yesterday
levels as (
    select
        all_candidates.*,
        meter_rules.threshold,
        meter_rules.severity,
        meter_rules.rule_description
    from (
        select
            *,
            true as is_today
        from candidates
        union all by name
        select
            *,
            false as is_today
        from candidates_yesterday
    ) as all_candidates
    inner join meter_rules
        on all_candidates.meter_id = meter_rules.meter_id
        and all_candidates.rule = meter_rules.rule
    where case when all_candidates.rule = 'allowance_used'
                then all_candidates.value >= meter_rules.threshold
            else all_candidates.value > meter_rules.threshold
        end
),

crossed_yesterday as (
    select
        check_day,
        customer_id,
        meter_id,
        rule,
        max(threshold) as threshold
    from levels
    where not is_today
    group by check_day, customer_id, meter_id, rule
),

-- report the highest threshold crossed (80% and 100% of an allowance are two levels); of a meter's
-- dimensions (a rule on the day's rows has one candidate per dimension) the one with the highest
-- value (the furthest outlier), the first of equals, whatever order the rows arrive in
crossed as (
    select * exclude (is_today)
    from levels
    where is_today
    qualify row_number() over (
            partition by check_day, customer_id, meter_id, rule
            order by threshold desc, value desc, dimension asc
        ) = 1
),

-- a lasting condition is raised again on the 1st of a month while it holds, so each month lists it
raised as (
    select crossed.*
    from crossed
    left join crossed_yesterday
        on crossed.check_day = crossed_yesterday.check_day
        and crossed.customer_id = crossed_yesterday.customer_id
        and crossed.meter_id = crossed_yesterday.meter_id
        and crossed.rule = crossed_yesterday.rule
    where crossed.rule not in ('allowance_used', 'week_over_week', 'scrape_gap', 'unmatched_series')
        or crossed_yesterday.threshold is null
        or crossed.threshold > crossed_yesterday.threshold
        or day(crossed.check_day) = 1
),

final as (
    select
        raised.check_day as day,
        raised.customer_id,
        raised.meter_id,
        raised.rule,
        raised.value,
        raised.threshold,
        raised.severity,
        raised.rule_description,
        raised.detail,
        to_billing_units(raised.quantity, meter_units.divisor) as quantity,
        case when raised.quantity is not null then meter_units.billing_unit end as unit,
        -- allowance_used: the included quantity (billing units) of the plan in force that its value is a percentage of
        allowances.included_quantity
    from raised
    left join meter_units
        on raised.meter_id = meter_units.meter_id
    left join allowances
        on raised.rule = 'allowance_used'
        and raised.check_day = allowances.check_day
        and raised.check_day = allowances.on_day
        and raised.customer_id = allowances.customer_id
        and raised.meter_id = allowances.meter_id
)

select * from final
