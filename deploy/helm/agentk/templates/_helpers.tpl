{{/* Name of the release's objects: the release name, with the chart name unless it already holds it. */}}
{{- define "agentk.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "agentk.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "agentk.labels" -}}
{{ include "agentk.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "agentk.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "agentk.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "agentk.secretName" -}}
{{- default (printf "%s-token" (include "agentk.fullname" .)) .Values.existingSecret -}}
{{- end -}}

{{/* kasAddress as a list, whether given as one string or several. */}}
{{- define "agentk.kasAddresses" -}}
{{- $a := .Values.kasAddress -}}
{{- if kindIs "string" $a -}}{{- $a = list $a | compact -}}{{- end -}}
{{- if not $a -}}{{- fail "kasAddress is required: kas's agent listener, e.g. grpcs://kas.example.com:8150" -}}{{- end -}}
{{- range $a -}}
{{- if not (regexMatch "^grpcs?://[^/]+:[0-9]+$" .) -}}
{{- fail (printf "kasAddress %q must be grpc://host:port or grpcs://host:port" .) -}}
{{- end -}}
{{- end -}}
{{- toJson $a -}}
{{- end -}}
